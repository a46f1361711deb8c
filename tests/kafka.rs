//! `bearwatch run` and `bearwatch produce` against a real Apache Kafka broker (KRaft, one node,
//! `scripts/kafka.sh`): counts, dead letters, the scored-news sink, late events, a consumer group
//! split across two processes, kill -9 recovery and a clean SIGTERM.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{LATEST_WINDOWS, Pipeline, assert_same_rows, brokers, checkpoint, counter, query, query_one, stories, unique};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

fn create_topic(name: &str, partitions: i32) {
    common::create_topic_on(brokers(), name, partitions);
}

fn produce(topic: &str, file: &Path) {
    common::produce_to(brokers(), topic, file);
}

fn kafka_pipeline(topic: &str, group: &str, storage: &str, extra: &str) -> String {
    format!(
        r#"
[source]
type = "kafka"
brokers = "{brokers}"
topics = ["{topic}"]
group_id = "{group}"
dead_letter_topic = "{topic}.dlq"

[source.properties]
"session.timeout.ms" = "6000"

[window]
size = "1d"
# Partitions are read interleaved, so event time is only roughly ordered; nothing here is late.
allowed_lateness = "30d"

[storage]
path = "{storage}"
checkpoint_interval = "300ms"

[run]
summary_interval = "0s"
{extra}
"#,
        brokers = brokers()
    )
}

/// Every message of `topic`, read from the start by a throwaway consumer.
fn read_all(topic: &str, expected: usize) -> Vec<(Option<String>, Vec<u8>, BTreeMap<String, String>)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", unique("reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut messages = Vec::new();
    while messages.len() < expected && Instant::now() < deadline {
        if let Some(message) = consumer.poll(Duration::from_millis(200)) {
            let message = message.unwrap();
            let headers = message
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|header| (header.key.to_string(), String::from_utf8_lossy(header.value.unwrap_or_default()).into_owned()))
                        .collect()
                })
                .unwrap_or_default();
            let key = message.key().map(|k| String::from_utf8_lossy(k).into_owned());
            messages.push((key, message.payload().unwrap_or_default().to_vec(), headers));
        }
    }
    // Anything beyond what was expected is a failure too: give it a moment to show up.
    if let Some(Ok(extra)) = consumer.poll(Duration::from_millis(500)) {
        panic!("more than {expected} messages in {topic}: offset {}", extra.offset());
    }
    messages
}

/// Committed offset and high watermark of every partition of `topic` for `group`.
fn committed_and_end(topic: &str, group: &str, partitions: i32) -> Vec<(i64, i64)> {
    let consumer: BaseConsumer =
        ClientConfig::new().set("bootstrap.servers", brokers()).set("group.id", group).create().unwrap();
    let mut list = TopicPartitionList::new();
    for p in 0..partitions {
        list.add_partition(topic, p);
    }
    let committed = consumer.committed_offsets(list, Duration::from_secs(10)).unwrap();
    (0..partitions)
        .map(|p| {
            let offset = match committed.find_partition(topic, p).unwrap().offset() {
                Offset::Offset(o) => o,
                other => panic!("partition {p}: no committed offset ({other:?})"),
            };
            let (_, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(10)).unwrap();
            (offset, high)
        })
        .collect()
}

/// Σ over windows of the newest `n + copies` of the `all` group (counts only grow, so the newest is
/// the max): every story once, as a story or as a copy of one.
const ALL_TOTAL: &str = "SELECT CAST(sum(m) AS BIGINT) FROM (SELECT max(n + copies) AS m FROM windows WHERE topic = 'all' GROUP BY window_start)";

#[test]
fn every_story_once_bad_messages_to_the_dead_letter_topic_and_a_clean_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let topic = unique("news");
    create_topic(&topic, 3);
    let good = 400;
    let mut input = stories(good).into_bytes();
    let story = |id: &str, at: &str| format!(r#"{{"id":"{id}","published_at":"{at}","headline":"Grain exports fall"}}"#);
    for line in [
        "{\"id\":\"j\",".to_string(),
        r#"{"id":"h","published_at":"1987-03-01T00:00:00Z"}"#.to_string(),
        r#"{"id":"t","published_at":"1987-03-01T00:00:00Z","headline":["not","a","string"]}"#.to_string(),
        story("future", "2999-03-01T00:00:00Z"),
        story("past", "1066-10-14T09:00:00Z"),
        format!(r#"{{"id":"big","published_at":"1987-03-01T00:00:00Z","headline":"{}"}}"#, "x".repeat(1024 * 1024)),
    ] {
        input.extend_from_slice(line.as_bytes());
        input.push(b'\n');
    }
    input.extend_from_slice(b"{\"id\":\"u\",\"published_at\":\"1987-03-01T00:00:00Z\",\"headline\":\"caf\xe9\"}\n");
    let file = dir.path().join("in.jsonl");
    std::fs::write(&file, input).unwrap();
    produce(&topic, &file);

    let scored_topic = format!("{topic}.scored");
    let group = unique("group");
    let sink = format!("[sink]\ntopic = \"{scored_topic}\"\n");
    let mut pipeline = Pipeline::start(dir.path(), "p", &kafka_pipeline(&topic, &group, "store", &sink));
    pipeline.wait_for_checkpoint(Duration::from_secs(90), "all messages", |c| counter(c, "received") == good as u64 + 7);
    pipeline.signal("TERM");
    let status = pipeline.wait(Duration::from_secs(30));
    assert!(status.success(), "SIGTERM must exit 0: {status}\n{}", pipeline.logs());

    let storage = &pipeline.storage;
    assert_eq!(query_one(storage, "SELECT count(*) FROM news"), good.to_string());
    assert_eq!(query_one(storage, "SELECT count(DISTINCT id) FROM news"), good.to_string());
    assert_eq!(query_one(storage, "SELECT count(DISTINCT kafka_partition) FROM news"), "3");
    assert_eq!(query_one(storage, ALL_TOTAL), good.to_string());
    let saved = checkpoint(storage).unwrap();
    assert_eq!((counter(&saved, "scored"), counter(&saved, "dead_lettered")), (good as u64, 7));

    // Offsets committed to the group only after the checkpoint that covers them: all of them now.
    let positions = committed_and_end(&topic, &group, 3);
    assert!(positions.iter().all(|(committed, end)| committed == end), "{positions:?}");
    assert_eq!(positions.iter().map(|(_, end)| end).sum::<i64>(), good as i64 + 7);

    let dead = read_all(&format!("{topic}.dlq"), 7);
    let mut kinds: Vec<&str> = dead.iter().map(|(_, _, h)| h["error.kind"].as_str()).collect();
    kinds.sort();
    assert_eq!(
        kinds,
        ["invalid_utf8", "json", "missing_field", "timestamp_out_of_range", "timestamp_out_of_range", "too_large", "wrong_type"]
    );
    for (_, payload, headers) in &dead {
        assert_eq!(headers["source.topic"], topic);
        assert!(headers["source.partition"].parse::<i32>().is_ok() && headers["source.offset"].parse::<i64>().is_ok());
        assert!(!headers["error.message"].is_empty());
        if headers["error.kind"] == "too_large" {
            assert_eq!(headers["payload.truncated"], "true");
            assert_eq!(payload.len(), 64 * 1024);
        } else {
            assert!(payload.starts_with(b"{\"id\":\""), "the original bytes: {}", String::from_utf8_lossy(payload));
        }
    }
    let missing = dead.iter().find(|(_, _, h)| h["error.kind"] == "missing_field").unwrap();
    assert_eq!(missing.2["error.message"], "missing required field `headline`");

    let scored = read_all(&scored_topic, good);
    assert_eq!(scored.len(), good);
    for (key, payload, _) in &scored {
        let story: serde_json::Value = serde_json::from_slice(payload).unwrap();
        assert_eq!(key.as_deref(), story["topic"].as_str(), "news.scored is keyed by topic");
        assert!(story["p_negative"].is_number() && story["kafka_offset"].is_number() && story["headline"].is_string());
    }
}

/// A story with a long body (`max_message_bytes` raised past what the scored topic takes): the sink
/// gets it without its body, where the broker's refusal would end every run that reads it again.
#[test]
fn a_story_too_large_for_the_scored_topic_goes_there_without_its_body() {
    let dir = tempfile::tempdir().unwrap();
    let topic = unique("long-body");
    create_topic(&topic, 1);
    let scored_topic = format!("{topic}.scored");
    common::create_topic_with(brokers(), &scored_topic, 1, &[("max.message.bytes", "1048588")]);
    let mut input = stories(20);
    input.push_str(&format!("{{\"id\":\"long\",\"published_at\":\"1987-03-02T10:00:00Z\",\"headline\":\"Grain exports fall\",\"body\":\"{}\"}}\n", "y".repeat(1_500_000)));
    let file = dir.path().join("in.jsonl");
    std::fs::write(&file, input).unwrap();
    produce(&topic, &file);
    let sink = format!("[sink]\ntopic = \"{scored_topic}\"\n");
    let config = kafka_pipeline(&topic, &unique("group"), "store", &sink).replace("dead_letter_topic", "max_message_bytes = 4194304\ndead_letter_topic");
    let mut pipeline = Pipeline::start(dir.path(), "p", &config);
    pipeline.wait_for_checkpoint(Duration::from_secs(90), "21 stories", |c| counter(c, "scored") == 21);
    pipeline.signal("TERM");
    assert!(pipeline.wait(Duration::from_secs(30)).success(), "{}", pipeline.logs());
    let scored = read_all(&scored_topic, 21);
    let long: Vec<serde_json::Value> =
        scored.iter().map(|(_, payload, _)| serde_json::from_slice::<serde_json::Value>(payload).unwrap()).filter(|s| s["id"] == "long").collect();
    assert_eq!(long.len(), 1, "the long story once");
    assert!(long[0].get("body").is_none() && long[0]["headline"] == "Grain exports fall" && long[0]["p_negative"].is_number(), "{}", long[0]);
    assert_eq!(query_one(&pipeline.storage, "SELECT length(body) FROM news WHERE id = 'long'"), "1500000", "news keeps it whole");
}

/// A `[sink]` that names no brokers publishes on the source's cluster, so it logs in as the source
/// does, with its own properties on top. With a file source it connected with its own properties
/// only (no login: nothing published), and beside a kafka source its properties were ignored.
#[test]
fn a_sink_that_names_no_brokers_logs_in_as_the_source_does_with_its_own_properties() {
    let dir = tempfile::tempdir().unwrap();
    let scored_topic = unique("file-scored");
    create_topic(&scored_topic, 1);
    std::fs::write(dir.path().join("in.jsonl"), stories(20)).unwrap();
    let (sasl, login) = common::sasl_brokers();
    let config = format!(
        "[source]\ntype = \"file\"\npath = \"in.jsonl\"\nbrokers = \"{sasl}\"\n[source.properties]\n{login}\
         [storage]\npath = \"store\"\n[run]\nsummary_interval = \"0s\"\n\
         [sink]\ntopic = \"{scored_topic}\"\n[sink.properties]\n\"compression.type\" = \"gzip\"\n"
    );
    let mut run = Pipeline::start(dir.path(), "p", &config);
    assert!(run.wait(Duration::from_secs(90)).success(), "{}", run.logs());
    assert_eq!(read_all(&scored_topic, 20).len(), 20);
    // Beside a kafka source too, the sink's properties are applied: one that librdkafka refuses
    // is an error at the start (it was ignored).
    let topic = unique("sink-properties");
    create_topic(&topic, 1);
    let sink = format!("[sink]\ntopic = \"{scored_topic}\"\n[sink.properties]\n\"compression.type\" = \"brotli\"\n");
    let mut refused = Pipeline::start(dir.path(), "bad", &kafka_pipeline(&topic, &unique("group"), "store2", &sink));
    assert!(!refused.wait(Duration::from_secs(60)).success());
    assert!(refused.logs().contains("compression.type"), "{}", refused.logs());
}

#[test]
fn stories_behind_the_watermark_go_to_the_late_table() {
    let dir = tempfile::tempdir().unwrap();
    let topic = unique("late");
    create_topic(&topic, 1);
    let story = |id: &str, at: &str| format!("{{\"id\":\"{id}\",\"published_at\":\"{at}\",\"headline\":\"Copper prices slump\"}}\n");
    std::fs::write(dir.path().join("first.jsonl"), story("a", "1987-03-02T10:00:00Z") + &story("b", "1987-03-02T12:30:00Z")).unwrap();
    std::fs::write(dir.path().join("second.jsonl"), story("c", "1987-03-02T10:30:00Z") + &story("d", "1987-03-02T12:10:00Z")).unwrap();
    produce(&topic, &dir.path().join("first.jsonl"));
    produce(&topic, &dir.path().join("second.jsonl"));

    let config = kafka_pipeline(&topic, &unique("group"), "store", "")
        .replace("size = \"1d\"", "size = \"1h\"")
        .replace("allowed_lateness = \"30d\"", "allowed_lateness = \"15m\"");
    let mut pipeline = Pipeline::start(dir.path(), "p", &config);
    pipeline.wait_for_checkpoint(Duration::from_secs(60), "four stories", |c| counter(c, "scored") == 4);
    pipeline.signal("TERM");
    assert!(pipeline.wait(Duration::from_secs(30)).success());

    let storage = &pipeline.storage;
    // Watermark 12:15 after "b": the 10:00 window has closed, so "c" is late; "d" (12:10) is not.
    assert_eq!(query(storage, "SELECT id FROM late"), vec![vec!["c".to_string()]]);
    assert_eq!(query_one(storage, "SELECT count(*) FROM news"), "4");
    assert_eq!(
        query(storage, "SELECT CAST(window_start AS VARCHAR), n FROM windows WHERE final AND topic = 'all' ORDER BY 1"),
        vec![vec!["1987-03-02T10:00:00Z".to_string(), "1".to_string()]]
    );
    assert_eq!(counter(&checkpoint(storage).unwrap(), "late"), 1);
}

/// One story dated 50 minutes ahead (a producer with a wrong clock or time zone, inside
/// `max_clock_skew`) counts in its window, but the stories after it, dated now, are not late.
#[test]
fn a_story_from_a_clock_ahead_does_not_make_the_stories_after_it_late() {
    let dir = tempfile::tempdir().unwrap();
    let topic = unique("clock-ahead");
    create_topic(&topic, 1);
    let now = chrono::Utc::now();
    let at = |minutes: i64| (now + chrono::Duration::minutes(minutes)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let story = |id: String, at: String| format!("{{\"id\":\"{id}\",\"published_at\":\"{at}\",\"headline\":\"Copper prices slump\"}}\n");
    let before: String = (0..5).map(|i| story(format!("before-{i}"), at(i - 5))).collect();
    let after: String = (0..20).map(|i| story(format!("after-{i}"), at(0))).collect();
    std::fs::write(dir.path().join("before.jsonl"), before).unwrap();
    std::fs::write(dir.path().join("ahead.jsonl"), story("ahead".into(), at(50))).unwrap();
    std::fs::write(dir.path().join("after.jsonl"), after).unwrap();
    for file in ["before.jsonl", "ahead.jsonl", "after.jsonl"] {
        produce(&topic, &dir.path().join(file));
    }
    let config = kafka_pipeline(&topic, &unique("group"), "store", "")
        .replace("size = \"1d\"", "size = \"10m\"")
        .replace("allowed_lateness = \"30d\"", "allowed_lateness = \"10m\"");
    let mut pipeline = Pipeline::start(dir.path(), "p", &config);
    pipeline.wait_for_checkpoint(Duration::from_secs(120), "26 stories", |c| counter(c, "scored") == 26);
    pipeline.signal("TERM");
    assert!(pipeline.wait(Duration::from_secs(30)).success(), "{}", pipeline.logs());
    let storage = &pipeline.storage;
    assert_eq!(counter(&checkpoint(storage).unwrap(), "late"), 0, "no story is late");
    assert_eq!(query_one(storage, "SELECT count(*) FROM news"), "26");
    // The story from ahead is in its own window, still open.
    let ahead = query(storage, "SELECT n FROM windows WHERE topic = 'all' AND window_start > now() + INTERVAL '30 minutes'");
    assert_eq!(ahead, vec![vec!["1".to_string()]]);
}

#[test]
fn two_processes_in_one_group_split_the_partitions_and_process_every_story_once() {
    let dir = tempfile::tempdir().unwrap();
    let topic = unique("split");
    create_topic(&topic, 4);
    let group = unique("group");
    let mut a = Pipeline::start(dir.path(), "a", &kafka_pipeline(&topic, &group, "store-a", ""));
    let mut b = Pipeline::start(dir.path(), "b", &kafka_pipeline(&topic, &group, "store-b", ""));
    common::wait_for_partitions(&[&a, &b], Duration::from_secs(60));

    let total = 600;
    let file = dir.path().join("in.jsonl");
    std::fs::write(&file, stories(total)).unwrap();
    produce(&topic, &file);
    let scored = |p: &Pipeline| checkpoint(&p.storage).map_or(0, |c| counter(&c, "scored"));
    let deadline = Instant::now() + Duration::from_secs(90);
    while scored(&a) + scored(&b) < total as u64 {
        assert!(Instant::now() < deadline, "stories missing\n{}\n{}", a.logs(), b.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    a.signal("TERM");
    b.signal("TERM");
    assert!(a.wait(Duration::from_secs(30)).success(), "{}", a.logs());
    assert!(b.wait(Duration::from_secs(30)).success(), "{}", b.logs());

    let ids = |p: &Pipeline| -> Vec<String> { query(&p.storage, "SELECT id FROM news").into_iter().map(|r| r[0].clone()).collect() };
    let (ids_a, ids_b) = (ids(&a), ids(&b));
    assert!(!ids_a.is_empty() && !ids_b.is_empty(), "one member did all the work: {} / {}", ids_a.len(), ids_b.len());
    let union: BTreeSet<&String> = ids_a.iter().chain(&ids_b).collect();
    assert_eq!((ids_a.len() + ids_b.len(), union.len()), (total, total), "every story exactly once");
    let windowed: u64 = [&a, &b].iter().map(|p| query_one(&p.storage, ALL_TOTAL).parse::<u64>().unwrap()).sum();
    assert_eq!(windowed, total as u64);
}

/// The topic gets its second half only after the kill, so the kill lands mid-stream however fast
/// the machine scores.
#[test]
fn a_kill_9_mid_stream_and_a_restart_give_the_same_windows_as_an_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let topic = unique("crash");
    create_topic(&topic, 2);
    let total = 1500u64;
    let all = stories(total as usize);
    let lines: Vec<&str> = all.lines().collect();
    let (first_half, second_half) = lines.split_at(lines.len() / 2);
    let produce_lines = |lines: &[&str], name: &str| {
        let file = dir.path().join(name);
        std::fs::write(&file, lines.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
        produce(&topic, &file);
    };
    produce_lines(first_half, "first.jsonl");

    let config = kafka_pipeline(&topic, &unique("group"), "crashed", "");
    let mut first = Pipeline::start(dir.path(), "first", &config);
    first.wait_for_checkpoint(Duration::from_secs(120), "300 stories", |c| counter(c, "scored") >= 300);
    first.signal("KILL");
    first.wait(Duration::from_secs(10));
    produce_lines(second_half, "second.jsonl");

    let mut whole = Pipeline::start(dir.path(), "whole", &kafka_pipeline(&topic, &unique("group"), "whole", ""));
    whole.wait_for_checkpoint(Duration::from_secs(120), "every story", |c| counter(c, "scored") == total);
    whole.signal("TERM");
    assert!(whole.wait(Duration::from_secs(30)).success());

    let mut second = Pipeline::start(dir.path(), "second", &config);
    second.wait_for_checkpoint(Duration::from_secs(120), "every story", |c| counter(c, "scored") >= total);
    second.signal("TERM");
    assert!(second.wait(Duration::from_secs(30)).success());
    assert!(std::fs::read_to_string(&second.stderr).unwrap().contains("resuming from checkpoint"));

    let crashed = &second.storage;
    assert_eq!(counter(&checkpoint(crashed).unwrap(), "scored"), total);
    assert_eq!(query_one(crashed, "SELECT count(*) FROM news"), total.to_string());
    assert_eq!(query_one(crashed, "SELECT count(DISTINCT id) FROM news"), total.to_string());
    assert_same_rows(&query(crashed, LATEST_WINDOWS), &query(&whole.storage, LATEST_WINDOWS), "windows");
}

/// DESIGN §1's scale-out: `classify` instances share a group on the news topic and publish scored
/// stories keyed by topic; an `aggregate` instance reads those and keeps the windows. One classify
/// process is killed mid-stream: the other takes over its partitions from their committed offsets,
/// some stories are scored and published twice, and the aggregate's de-duplication keeps each once.
#[test]
fn two_classify_processes_and_one_aggregate_window_every_story_once_even_when_one_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let topic = unique("roles");
    let scored_topic = format!("{topic}.scored");
    create_topic(&topic, 4);
    create_topic(&scored_topic, 3);
    let group = unique("group");
    let sink = format!("\n[sink]\ntopic = \"{scored_topic}\"\n");
    let http = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = kafka_pipeline(&topic, &group, "aggregate", &format!("{sink}\n[server]\nhttp = \"127.0.0.1:{http}\"\n"))
        .replace("\"session.timeout.ms\" = \"6000\"", "\"session.timeout.ms\" = \"6000\"\n\"statistics.interval.ms\" = \"500\"");
    let mut aggregate = Pipeline::start_with(dir.path(), "aggregate", &config, &["--role", "aggregate"]);
    // Classify commits rarely, so that the killed process surely leaves published but uncommitted
    // stories behind: its successor publishes them again.
    let classify = kafka_pipeline(&topic, &group, "aggregate", &sink).replace("checkpoint_interval = \"300ms\"", "checkpoint_interval = \"20s\"");
    let mut a = Pipeline::start_with(dir.path(), "classify-a", &classify, &["--role", "classify"]);
    let mut b = Pipeline::start_with(dir.path(), "classify-b", &classify, &["--role", "classify"]);
    common::wait_for_partitions(&[&a, &b, &aggregate], Duration::from_secs(60));

    let total = 3000u64;
    let file = dir.path().join("in.jsonl");
    std::fs::write(&file, stories(total as usize)).unwrap();
    produce(&topic, &file);
    aggregate.wait_for_checkpoint(Duration::from_secs(120), "400 stories", |c| counter(c, "scored") >= 400);
    a.signal("KILL");
    a.wait(Duration::from_secs(10));
    let at_kill = counter(&checkpoint(&aggregate.storage).unwrap(), "scored");
    assert!(at_kill < total, "the kill came after the end ({at_kill}); nothing was tested");
    // A HUP (a config reloader signals every instance) does not end a classify instance, which
    // has no rules to read again: `b` goes on alone.
    b.signal("HUP");

    aggregate.wait_for_checkpoint(Duration::from_secs(180), "every story", |c| counter(c, "scored") >= total);
    b.signal("TERM");
    assert!(b.wait(Duration::from_secs(30)).success(), "{}", b.logs());
    // Consumer lag per partition of the scored topic, from librdkafka's statistics: back to 0 once
    // everything is processed and committed.
    let lag_lines = |text: &str| -> Vec<String> {
        text.lines().filter(|l| l.starts_with("bearwatch_kafka_consumer_lag{") && l.contains(&scored_topic)).map(str::to_string).collect()
    };
    assert_eq!(ureq::get(format!("http://127.0.0.1:{http}/ready")).call().unwrap().status(), 200, "the broker is reachable");
    let deadline = Instant::now() + Duration::from_secs(30);
    let text = loop {
        let text = ureq::get(format!("http://127.0.0.1:{http}/metrics")).call().unwrap().body_mut().read_to_string().unwrap();
        let lines = lag_lines(&text);
        if lines.len() == 3 && lines.iter().all(|l| l.ends_with(" 0")) {
            break text;
        }
        assert!(Instant::now() < deadline, "lag per partition never reached 0: {lines:?}");
        std::thread::sleep(Duration::from_millis(200));
    };
    // The lag gauge as Prometheus's tools read it (tests/ops.rs checks the others).
    let others: Vec<&str> = bearwatch::telemetry::METRICS.iter().map(|m| m.0).filter(|n| *n != "bearwatch_kafka_consumer_lag").collect();
    common::check_with_prometheus_tools(&text, &others);
    aggregate.signal("TERM");
    assert!(aggregate.wait(Duration::from_secs(30)).success(), "{}", aggregate.logs());

    let store = &aggregate.storage;
    let saved = checkpoint(store).unwrap();
    assert!(counter(&saved, "duplicates") > 0, "the killed process left nothing to publish twice; the takeover was not tested");
    assert_eq!(counter(&saved, "scored"), total);
    assert_eq!(query_one(store, "SELECT count(*) FROM news"), total.to_string());
    assert_eq!(query_one(store, "SELECT count(DISTINCT id) FROM news"), total.to_string());
    assert_eq!(query_one(store, ALL_TOTAL), total.to_string(), "the `all` windows count every story once");
    // Each topic's windows came from one partition of the scored topic, so the topic sums match too.
    let per_topic = query(store, "SELECT topic, count(*) FROM news GROUP BY topic ORDER BY topic");
    let windowed = query(
        store,
        "SELECT topic, CAST(sum(n) AS BIGINT) FROM (SELECT topic, window_start, max(n + copies) AS n FROM windows WHERE topic <> 'all' \
         GROUP BY topic, window_start) GROUP BY topic ORDER BY topic",
    );
    assert_same_rows(&windowed, &per_topic, "per-topic windows");
    // The stories kept where they first entered: a partition and offset of the news topic.
    assert_eq!(query_one(store, "SELECT count(*) FROM news WHERE kafka_partition IS NULL OR kafka_offset IS NULL"), "0");
}

/// `bearwatch bench e2e` runs end to end against the real broker (tiny sizes; the real numbers come
/// from a release build, docs/BENCHMARKS.md).
#[test]
fn bench_e2e_measures_the_pipeline_from_kafka_beside_the_classifier_alone() {
    let out = Command::new(env!("CARGO_BIN_EXE_bearwatch"))
        .args(["bench", "e2e", "--brokers", brokers(), "--stories", "1500", "--repeats", "1"])
        .env("BEARWATCH_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let row = stdout.lines().find(|l| l.starts_with("| ") && l.chars().nth(2).is_some_and(|c| c.is_ascii_digit())).expect("a result row");
    let cells: Vec<f64> = row.split('|').map(str::trim).filter(|c| !c.is_empty()).filter_map(|c| c.trim_end_matches(" %").parse().ok()).collect();
    assert!(cells.len() >= 5 && cells.iter().all(|v| v.is_finite() && *v > 0.0), "{row}");
}

/// `bearwatch bench alerts` times real notifications: every burst's alert reaches its webhook, and
/// never sooner than its completing story was sent.
#[test]
fn bench_alerts_times_each_burst_from_kafka_to_the_webhook() {
    let out = Command::new(env!("CARGO_BIN_EXE_bearwatch"))
        .args(["bench", "alerts", "--brokers", brokers(), "--samples", "4", "--checkpoint-intervals", "1s", "--background-rate", "20"])
        .env("BEARWATCH_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let row = stdout.lines().find(|l| l.starts_with("| 1s |")).expect("a result row");
    let cells: Vec<&str> = row.split('|').map(str::trim).filter(|c| !c.is_empty()).collect();
    assert_eq!(cells[4], "4 of 4", "{row}");
    let (p50, p99): (f64, f64) = (cells[1].parse().unwrap(), cells[2].parse().unwrap());
    // A 1 s checkpoint cycle: each alert waits for at most one checkpoint plus the pipeline's work.
    assert!(p50 > 0.0 && p50 <= p99 && p99 < 10_000.0, "{row}");
}

/// A partition with no stories must not hold event time back: with every story in partition 0 of
/// two, windows still close (final rows) while the pipeline runs.
#[test]
fn an_empty_partition_does_not_stall_the_watermark() {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let dir = tempfile::tempdir().unwrap();
    let topic = unique("one-sided");
    common::create_topic_on(brokers(), &topic, 2);
    let producer: BaseProducer = ClientConfig::new().set("bootstrap.servers", brokers()).create().unwrap();
    let start = chrono::Utc::now() - chrono::Duration::days(3);
    for i in 0..30i64 {
        let published = (start + chrono::Duration::hours(2 * i)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let story = format!(r#"{{"id":"one-sided-{i}","published_at":"{published}","headline":"Oil prices fall as stocks build up {i}"}}"#);
        producer.send(BaseRecord::<str, str>::to(&topic).partition(0).key("k").payload(&story)).unwrap();
    }
    producer.flush(Duration::from_secs(30)).unwrap();

    let config = kafka_pipeline(&topic, &unique("g"), "store", "").replace("allowed_lateness = \"30d\"", "allowed_lateness = \"0s\"");
    let mut run = Pipeline::start(dir.path(), "p", &config);
    run.wait_for_checkpoint(Duration::from_secs(120), "every story", |c| counter(c, "scored") >= 30);
    // The consumer's statistics (every 5 s) report partition 1 as read to its end; then the windows
    // partition 0 has passed close.
    let deadline = Instant::now() + Duration::from_secs(60);
    while query_one(&run.storage, "SELECT count(*) FROM windows WHERE \"final\"") == "0" {
        assert!(Instant::now() < deadline, "no window closed: the empty partition holds the watermark\n{}", run.logs());
        std::thread::sleep(Duration::from_millis(500));
    }
    run.signal("TERM");
    assert!(run.wait(Duration::from_secs(60)).success(), "{}", run.logs());
    assert_eq!(counter(&checkpoint(&run.storage).unwrap(), "late"), 0);
}

/// Topics the broker stores compressed (its `compression.type`, or a producer's) are read with
/// every codec Kafka has: a zstd topic stalled the source, which retried the fetch it could not
/// decompress forever.
#[test]
fn topics_compressed_with_each_codec_kafka_has_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let codecs = ["gzip", "snappy", "lz4", "zstd"];
    let topics: Vec<String> = codecs.iter().map(|codec| unique(&format!("compressed-{codec}"))).collect();
    for (codec, topic) in codecs.iter().zip(&topics) {
        common::create_topic_with(brokers(), topic, 1, &[("compression.type", codec)]);
        let file = dir.path().join(format!("{codec}.jsonl"));
        let lines: String = (0..5).map(|i| format!("{{\"id\":\"{codec}-{i}\",\"published_at\":\"1987-03-02T10:00:00Z\",\"headline\":\"Copper prices slump\"}}\n")).collect();
        std::fs::write(&file, lines).unwrap();
        produce(topic, &file);
    }
    let listed = topics.iter().map(|t| format!("\"{t}\"")).collect::<Vec<_>>().join(", ");
    let config = kafka_pipeline(&topics[0], &unique("group"), "store", "").replace(&format!("topics = [\"{}\"]", topics[0]), &format!("topics = [{listed}]"));
    let mut pipeline = Pipeline::start(dir.path(), "p", &config);
    pipeline.wait_for_checkpoint(Duration::from_secs(90), "20 stories", |c| counter(c, "scored") == 20);
    pipeline.signal("TERM");
    assert!(pipeline.wait(Duration::from_secs(30)).success(), "{}", pipeline.logs());
    assert_eq!(
        query(&pipeline.storage, "SELECT split_part(id, '-', 1), count(*) FROM news GROUP BY 1 ORDER BY 1"),
        [["gzip", "5"], ["lz4", "5"], ["snappy", "5"], ["zstd", "5"]].map(|r| r.map(String::from).to_vec()).to_vec()
    );
}

/// `start_offset = "latest"` skips what a new group's partitions already hold, but a partition added
/// to the topic later is read from its beginning: the stories written to it before the consumer
/// learned of it were skipped, the partition starting at its latest offset like the group's first.
#[test]
fn with_start_offset_latest_a_partition_added_later_is_read_from_its_beginning() {
    use rdkafka::admin::{AdminClient, AdminOptions, NewPartitions};
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let dir = tempfile::tempdir().unwrap();
    let topic = unique("grows");
    common::create_topic_on(brokers(), &topic, 1);
    // The producer learns of the added partition at its next metadata refresh.
    let producer: BaseProducer = ClientConfig::new().set("bootstrap.servers", brokers()).set("topic.metadata.refresh.interval.ms", "200").create().unwrap();
    let send = |id: String, partition: i32| {
        let story = format!(r#"{{"id":"{id}","published_at":"1987-03-02T10:00:00Z","headline":"Copper prices slump"}}"#);
        let deadline = Instant::now() + Duration::from_secs(30);
        while let Err((e, _)) = producer.send(BaseRecord::<str, str>::to(&topic).partition(partition).key("k").payload(&story)) {
            assert!(Instant::now() < deadline, "cannot send to partition {partition}: {e}");
            producer.poll(Duration::from_millis(100));
        }
        producer.flush(Duration::from_secs(30)).unwrap();
    };
    for i in 0..3 {
        send(format!("before-{i}"), 0);
    }
    let config = kafka_pipeline(&topic, &unique("group"), "store", "")
        .replace("[source.properties]", "start_offset = \"latest\"\n\n[source.properties]\n\"topic.metadata.refresh.interval.ms\" = \"2000\"");
    let mut pipeline = Pipeline::start(dir.path(), "p", &config);
    common::wait_for_partitions(&[&pipeline], Duration::from_secs(60));
    // Where "latest" was is committed at the assignment, so a story sent after it is read.
    send("first".into(), 0);
    pipeline.wait_for_checkpoint(Duration::from_secs(60), "the first story", |c| counter(c, "scored") == 1);

    let admin: AdminClient<rdkafka::client::DefaultClientContext> = ClientConfig::new().set("bootstrap.servers", brokers()).create().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    for result in runtime.block_on(admin.create_partitions(&[NewPartitions::new(&topic, 2)], &AdminOptions::new())).unwrap() {
        result.unwrap();
    }
    for i in 0..5 {
        send(format!("added-{i}"), 1);
    }
    pipeline.wait_for_checkpoint(Duration::from_secs(90), "the added partition's stories", |c| counter(c, "scored") == 6);
    pipeline.signal("TERM");
    assert!(pipeline.wait(Duration::from_secs(30)).success(), "{}", pipeline.logs());
    let ids: Vec<String> = query(&pipeline.storage, "SELECT id FROM news ORDER BY id").into_iter().flatten().collect();
    assert_eq!(ids, ["added-0", "added-1", "added-2", "added-3", "added-4", "first"]);
}

/// A topic deleted and created again starts its offsets over: the stories of the new one are read,
/// not skipped as below the offsets the checkpoint holds from the old one.
#[test]
fn a_topic_deleted_and_created_again_is_read_from_its_start() {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let dir = tempfile::tempdir().unwrap();
    let topic = unique("recreated");
    create_topic(&topic, 1);
    let file = dir.path().join("first.jsonl");
    std::fs::write(&file, stories(20)).unwrap();
    produce(&topic, &file);
    let config = kafka_pipeline(&topic, &unique("group"), "store", "");
    let mut pipeline = Pipeline::start(dir.path(), "p", &config);
    pipeline.wait_for_checkpoint(Duration::from_secs(60), "20 stories", |c| counter(c, "scored") == 20);
    pipeline.signal("TERM");
    assert!(pipeline.wait(Duration::from_secs(30)).success(), "{}", pipeline.logs());

    let admin: AdminClient<rdkafka::client::DefaultClientContext> = ClientConfig::new().set("bootstrap.servers", brokers()).create().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    for result in runtime.block_on(admin.delete_topics(&[&topic], &AdminOptions::new())).unwrap() {
        result.unwrap();
    }
    // Deletion finishes in the background; the name is taken until it has.
    let deadline = Instant::now() + Duration::from_secs(60);
    while let Err(e) = runtime.block_on(admin.create_topics(&[NewTopic::new(&topic, 1, TopicReplication::Fixed(1))], &AdminOptions::new())).unwrap().remove(0) {
        assert!(Instant::now() < deadline, "cannot create {topic} again: {e:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let lines: String = (0..5).map(|i| format!("{{\"id\":\"again-{i}\",\"published_at\":\"1987-03-02T10:00:00Z\",\"headline\":\"Copper prices slump\"}}\n")).collect();
    let file = dir.path().join("again.jsonl");
    std::fs::write(&file, lines).unwrap();
    produce(&topic, &file);
    let mut pipeline = Pipeline::start(dir.path(), "p", &config);
    pipeline.wait_for_checkpoint(Duration::from_secs(60), "the new topic's 5 stories", |c| counter(c, "scored") == 25);
    pipeline.signal("TERM");
    assert!(pipeline.wait(Duration::from_secs(30)).success(), "{}", pipeline.logs());
    assert!(pipeline.logs().contains("the topic was recreated or truncated"), "{}", pipeline.logs());
    assert_eq!(query_one(&pipeline.storage, "SELECT count(*) FROM news WHERE id LIKE 'again-%'"), "5");
}

/// With the `[sink]` on another cluster (its own `brokers`), `aggregate` instances read the scored
/// stories there: they subscribed to the sink's topic on the source's cluster, where nothing is.
#[test]
fn aggregate_reads_a_sink_on_another_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let other = common::Broker::start();
    let topic = unique("split-clusters");
    let scored_topic = format!("{topic}.scored");
    create_topic(&topic, 1);
    common::create_topic_on(&other.brokers(), &scored_topic, 1);
    let sink = format!("\n[sink]\ntopic = \"{scored_topic}\"\nbrokers = \"{}\"\n", other.brokers());
    let config = kafka_pipeline(&topic, &unique("group"), "aggregate", &sink);
    let mut aggregate = Pipeline::start_with(dir.path(), "aggregate", &config, &["--role", "aggregate"]);
    let mut classify = Pipeline::start_with(dir.path(), "classify", &config.replace("path = \"aggregate\"", "path = \"classify\""), &["--role", "classify"]);
    let file = dir.path().join("in.jsonl");
    std::fs::write(&file, stories(30)).unwrap();
    produce(&topic, &file);
    aggregate.wait_for_checkpoint(Duration::from_secs(120), "30 scored stories from the other cluster", |c| counter(c, "scored") == 30);
    for run in [&mut classify, &mut aggregate] {
        run.signal("TERM");
        assert!(run.wait(Duration::from_secs(30)).success(), "{}", run.logs());
    }
    assert_eq!(query_one(&aggregate.storage, "SELECT count(DISTINCT id) FROM news"), "30");
}

/// `/ready`'s status and body once `wanted` holds for the body, polled while `run` keeps running
/// (at most a minute).
fn ready_until(http: u16, run: &mut Pipeline, wanted: impl Fn(&str) -> bool) -> (u16, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(mut response) = agent.get(format!("http://127.0.0.1:{http}/ready")).call() {
            let body = response.body_mut().read_to_string().unwrap();
            if wanted(&body) {
                return (response.status().as_u16(), body);
            }
        }
        assert!(Instant::now() < deadline && run.child.try_wait().unwrap().is_none(), "/ready never said what was wanted\n{}", run.logs());
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A source that cannot start says why in `/ready`: with a refused login the pipeline stays
/// "starting", and librdkafka's reason was only in the log.
#[test]
fn ready_says_why_the_source_has_not_started() {
    let dir = tempfile::tempdir().unwrap();
    let topic = unique("locked");
    create_topic(&topic, 1);
    let (sasl, login) = common::sasl_brokers();
    let http = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = kafka_pipeline(&topic, &unique("group"), "store", &format!("\n[server]\nhttp = \"127.0.0.1:{http}\"\n"))
        .replace(brokers(), &sasl)
        .replace("[source.properties]\n", &format!("[source.properties]\n{}", login.replace("bearwatch-secret", "not-the-password")));
    let mut run = Pipeline::start(dir.path(), "p", &config);
    // librdkafka's reason comes beside its consequences ("all broker connections are down").
    let (status, body) = ready_until(http, &mut run, |body| body.contains("Authentication failed"));
    assert_eq!(status, 503, "{body}");
    assert!(body.starts_with("starting\nwarning: source errors since ") && body.lines().count() == 2, "{body}");
    run.signal("TERM");
    assert!(run.wait(Duration::from_secs(30)).success(), "{}", run.logs());
}

/// While no broker answers, librdkafka hands over an error at every poll and reconnect; each was
/// logged, some 30 lines a second (2.6 million a day, while an outage lasts). Now each kind of
/// error is logged once and then once every half minute with how many were held back; `/ready`
/// still counts every one. The idle live summary is not repeated at every interval either.
#[test]
fn an_unreachable_broker_is_logged_once_in_a_while_not_at_every_poll() {
    let dir = tempfile::tempdir().unwrap();
    // A port nothing listens on (bound, then freed).
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let http = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = kafka_pipeline("news", &unique("group"), "store", &format!("\n[server]\nhttp = \"127.0.0.1:{http}\"\n"))
        .replace(brokers(), &format!("127.0.0.1:{closed}"))
        .replace("summary_interval = \"0s\"", "summary_interval = \"100ms\"");
    let mut run = Pipeline::start(dir.path(), "p", &config);
    let reported = |body: &str| -> u64 {
        body.split("source errors since ").nth(1).and_then(|rest| rest.split_once(" (")?.1.split_once(',')?.0.parse().ok()).unwrap_or(0)
    };
    let (status, body) = ready_until(http, &mut run, |body| reported(body) >= 300);
    assert_eq!(status, 503, "{body}");
    let logged = std::fs::read_to_string(&run.stderr).unwrap().lines().filter(|l| l.contains("kafka consumer") || l.contains("rdkafka::client")).count();
    assert!(logged <= 30, "{} errors reported, {logged} lines logged:\n{}", reported(&body), run.logs());
    // Nothing arrives, so the live summary (every 100 ms here) has nothing new to say: it was
    // printed at every interval, and now once a minute while idle.
    let summaries = std::fs::read_to_string(&run.stdout).unwrap().lines().filter(|l| l.contains(" scored ")).count();
    assert!((1..=2).contains(&summaries), "{summaries} summary lines while idle:\n{}", run.logs());
    run.signal("TERM");
    assert!(run.wait(Duration::from_secs(30)).success(), "{}", run.logs());
}

/// A subscribed topic the brokers do not have (a misspelt name) is named in `/ready` for as long as
/// it is missing: librdkafka reports it once and then waits for it.
#[test]
fn ready_names_a_subscribed_topic_that_does_not_exist_until_it_does() {
    let dir = tempfile::tempdir().unwrap();
    let (topic, missing) = (unique("present"), unique("misspelt"));
    create_topic(&topic, 1);
    let http = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = kafka_pipeline(&topic, &unique("group"), "store", &format!("\n[server]\nhttp = \"127.0.0.1:{http}\"\n"))
        .replace(&format!("topics = [\"{topic}\"]"), &format!("topics = [\"{topic}\", \"{missing}\"]"));
    let mut run = Pipeline::start(dir.path(), "p", &config);
    let (status, body) = ready_until(http, &mut run, |body| body.contains("do not have"));
    let named = format!("ready\nwarning: subscribed topics the brokers do not have: {missing} (nothing is read from them until they are created)\n");
    assert!(status == 200 && body.starts_with(&named), "{body}");
    create_topic(&missing, 1);
    // Gone at the next look (librdkafka's own report of it stays among the recent errors a while).
    let (status, body) = ready_until(http, &mut run, |body| !body.contains("do not have"));
    assert!(status == 200 && body.starts_with("ready\n"), "{body}");
    assert!(run.child.try_wait().unwrap().is_none(), "{}", run.logs());
    run.signal("TERM");
    assert!(run.wait(Duration::from_secs(30)).success(), "{}", run.logs());
}

/// A pipeline that evaluates no rules (role `classify`) reads its tokens, and the rules its
/// verdicts are given against, again on `POST /api/rules/reload` and on SIGHUP, as a pipeline with
/// rules does. Before, it answered 409, ignored the signal, and a leaked token held until a restart.
/// A pipeline started without rules (here `aggregate`) is refused rules added by a reload: its
/// alerting stage is built at the start.
#[test]
fn a_pipeline_without_rules_reloads_its_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let topic = unique("classify-reload");
    create_topic(&topic, 1);
    let (old, new, newest) = ("0ld-t0ken-0123456789abcdef", "n3w-t0ken-0123456789abcdef", "n3west-t0ken-0123456789abcdef");
    let http = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    // One group id for every version of the file: a reload refuses a changed [source].
    let group = unique("group");
    let version = |token: &str, rules: &str| {
        kafka_pipeline(&topic, &group, "classify", &format!("{rules}\n[sink]\ntopic = \"{topic}.scored\"\n[server]\nhttp = \"127.0.0.1:{http}\"\nauth_token = \"{token}\"\n"))
    };
    let first = version(old, "");
    let mut run = Pipeline::start_with(dir.path(), "classify", &first, &["--role", "classify"]);
    let api = common::api::Api::new(&format!("http://127.0.0.1:{http}"));
    rules_once_allowed(&api, &mut run, old);

    // Over HTTP: the old token asks, and is refused from the next request on.
    std::fs::write(dir.path().join("classify.toml"), version(new, "")).unwrap();
    let (status, reloaded) = api.call("POST", "/api/rules/reload", Some(old), None);
    assert_eq!(status, 200, "{reloaded}\n{}", run.logs());
    assert_eq!((reloaded["rules"].as_u64(), reloaded["resolved"].as_u64()), (Some(0), Some(0)), "{reloaded}");
    assert_eq!(api.call("GET", "/api/rules", Some(old), None).0, 401, "the old token is revoked");
    assert_eq!(api.call("GET", "/api/rules", Some(new), None).0, 200);

    // On SIGHUP: the token again, and rule files, which verdicts are given against here.
    std::fs::write(
        dir.path().join("rules.toml"),
        "[[rules]]\nname = \"market-busy\"\nseverity = \"info\"\ngroup = \"all\"\nmetric = \"n\"\n[rules.condition]\nkind = \"threshold\"\nop = \">=\"\nvalue = 1\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("classify.toml"), version(newest, "[alerts]\nrules = [\"rules.toml\"]\n")).unwrap();
    run.signal("HUP");
    let rules = rules_once_allowed(&api, &mut run, newest);
    assert!(rules["rules"].as_array().is_some_and(|r| r.len() == 1) && rules["rules_hash"].is_string(), "{rules}");
    assert_eq!(api.call("GET", "/api/rules", Some(new), None).0, 401);

    // Any other change is refused by name, as where rules run.
    std::fs::write(dir.path().join("classify.toml"), version(newest, "[alerts]\nrules = [\"rules.toml\"]\n").replace("size = \"1d\"", "size = \"2d\"")).unwrap();
    let (status, refused) = api.call("POST", "/api/rules/reload", Some(newest), None);
    assert!(status == 400 && refused["error"].as_str().unwrap().contains("[window]"), "{status} {refused}");
    run.signal("TERM");
    assert!(run.wait(Duration::from_secs(30)).success(), "{}", run.logs());
    drop(api);

    // Role aggregate, started without rules: rules added by a reload are refused.
    let aggregate_http = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let aggregate_config = version(old, "").replace(&format!("127.0.0.1:{http}"), &format!("127.0.0.1:{aggregate_http}")).replace("path = \"classify\"", "path = \"aggregate\"");
    let mut aggregate = Pipeline::start_with(dir.path(), "aggregate", &aggregate_config, &["--role", "aggregate"]);
    let api = common::api::Api::new(&format!("http://127.0.0.1:{aggregate_http}"));
    rules_once_allowed(&api, &mut aggregate, old);
    std::fs::write(dir.path().join("aggregate.toml"), aggregate_config.replace("[sink]", "[alerts]\nrules = [\"rules.toml\"]\n[sink]")).unwrap();
    let (status, refused) = api.call("POST", "/api/rules/reload", Some(old), None);
    assert!(status == 400 && refused["error"].as_str().unwrap().contains("started without rules"), "{status} {refused}");
    aggregate.signal("TERM");
    assert!(aggregate.wait(Duration::from_secs(30)).success(), "{}", aggregate.logs());

    // A rule file a reload would refuse stops a classify start too, naming the file and the rule.
    std::fs::write(
        dir.path().join("ticker-rules.toml"),
        "[[rules]]\nname = \"ticker-busy\"\nseverity = \"info\"\ngroup = \"ticker\"\nmetric = \"n\"\n[rules.condition]\nkind = \"threshold\"\nop = \">=\"\nvalue = 1\n",
    )
    .unwrap();
    let refused = version(old, "[alerts]\nrules = [\"ticker-rules.toml\"]\n");
    let mut run = Pipeline::start_with(dir.path(), "classify", &refused, &["--role", "classify"]);
    assert!(!run.wait(Duration::from_secs(60)).success(), "{}", run.logs());
    let logs = run.logs();
    assert!(logs.contains("ticker-rules.toml") && logs.contains("ticker-busy") && logs.contains("not per ticker"), "{logs}");
}

/// `GET /api/rules` once `token` is let in (the API is up, or a reload put the token in force),
/// polled while `run` keeps running (at most a minute).
fn rules_once_allowed(api: &common::api::Api, run: &mut Pipeline, token: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    let auth = format!("Bearer {token}");
    loop {
        if let Ok((200, _, body)) = api.raw("GET", "/api/rules", &[("Authorization", &auth)], None) {
            return serde_json::from_str(&body).unwrap();
        }
        assert!(Instant::now() < deadline && run.child.try_wait().unwrap().is_none(), "the API never let {token} in\n{}", run.logs());
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Role `aggregate` takes topics and model names from the scored messages it reads; each topic is a
/// window group. A topic or model name no model could give (60 KB long, blank, a control
/// character), or a topic past the most a model may have, is dead-lettered with the reason
/// instead of being held in every window, checkpoint and summary.
#[test]
fn an_aggregate_refuses_topics_no_model_could_give() {
    let dir = tempfile::tempdir().unwrap();
    let topic = unique("agg-topics");
    let scored_topic = format!("{topic}.scored");
    create_topic(&topic, 1);
    create_topic(&scored_topic, 1);
    let scored = |i: usize, topic: &str, model: &str| {
        serde_json::json!({"id": format!("s{i}"), "published_at": format!("2024-03-01T10:{:02}:00Z", i % 60),
            "headline": format!("Shares fall on news {i}"), "topic": topic, "topic_score": 0.9, "sentiment": "negative",
            "p_negative": 0.8, "p_neutral": 0.1, "p_positive": 0.1, "sentiment_score": -0.7, "model": model})
        .to_string()
    };
    // 256 topics are counted; the next new ones are not, while the 256 go on being counted.
    let mut lines: Vec<String> = (0..256).map(|i| scored(i, &format!("topic-{i}"), "m@1")).collect();
    lines.push(scored(256, &format!("energy{}", "x".repeat(60_000)), "m@1"));
    lines.push(scored(257, "energy", &"m".repeat(60_000)));
    lines.push(scored(258, "energy\u{2028}forged", "m@1"));
    lines.extend((259..262).map(|i| scored(i, &format!("topic-{i}"), "m@1")));
    lines.push(scored(262, "topic-0", "m@1"));
    let file = dir.path().join("scored.jsonl");
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    produce(&scored_topic, &file);
    let config = kafka_pipeline(&topic, &unique("group"), "aggregate", &format!("\n[sink]\ntopic = \"{scored_topic}\"\n"));
    let mut aggregate = Pipeline::start_with(dir.path(), "aggregate", &config, &["--role", "aggregate"]);
    aggregate.wait_for_checkpoint(Duration::from_secs(120), "257 counted and 6 dead-lettered", |c| {
        counter(c, "scored") == 257 && counter(c, "dead_lettered") == 6
    });
    aggregate.signal("TERM");
    assert!(aggregate.wait(Duration::from_secs(30)).success(), "{}", aggregate.logs());
    let dead = read_all(&format!("{topic}.dlq"), 6);
    let mut reasons: Vec<String> = dead.iter().map(|(_, _, h)| format!("{} {}", h["error.kind"], h["error.message"])).collect();
    reasons.sort();
    assert_eq!(reasons.len(), 6, "{reasons:?}");
    assert!(reasons.iter().all(|r| r.starts_with("invalid_scores ") && r.len() < 300), "{reasons:?}");
    for (wanted, count) in [("60006 characters, more than 64", 1), ("more than 128", 1), ("control character", 1), ("would be topic number 257", 3)] {
        assert_eq!(reasons.iter().filter(|r| r.contains(wanted)).count(), count, "{wanted}: {reasons:?}");
    }
    assert_eq!(query_one(&aggregate.storage, "SELECT count(DISTINCT topic) FROM news"), "256");
    assert_eq!(query_one(&aggregate.storage, "SELECT count(*) FROM news WHERE topic = 'topic-0'"), "2");
    assert_eq!(query_one(&aggregate.storage, "SELECT max(length(topic)) FROM windows"), "9");
}

/// A checkpoint with nothing new is not written: an idle feed rewrote the whole state (tens of MB
/// on a long run: tracked stories, kept windows, recent copies) every `checkpoint_interval`. New
/// stories are checkpointed as before.
#[test]
fn an_idle_feed_writes_no_checkpoint_until_a_story_comes() {
    let dir = tempfile::tempdir().unwrap();
    let topic = unique("idle");
    create_topic(&topic, 1);
    let http = common::servers::free_port();
    let config = kafka_pipeline(&topic, &unique("group"), "store", &format!("\n[server]\nhttp = \"127.0.0.1:{http}\"\n"));
    let mut pipeline = Pipeline::start(dir.path(), "p", &config);
    let all = stories(310);
    let (first, later): (Vec<&str>, Vec<&str>) = (all.lines().take(300).collect(), all.lines().skip(300).collect());
    let file = dir.path().join("first.jsonl");
    std::fs::write(&file, first.join("\n") + "\n").unwrap();
    produce(&topic, &file);
    pipeline.wait_for_checkpoint(Duration::from_secs(120), "300 stories", |c| counter(c, "scored") == 300);
    let unchanged = || common::metric(http, "bearwatch_checkpoints_unchanged_total");
    let wait_for_unchanged = |at_least: u64| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while unchanged() < at_least {
            assert!(Instant::now() < deadline, "no checkpoint was found unchanged\n{}", pipeline.logs());
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    wait_for_unchanged(1);
    let written_at = |c: serde_json::Value| c["written_at"].as_str().unwrap().to_string();
    let idle_since = written_at(checkpoint(&pipeline.storage).unwrap());
    let skipped = unchanged();
    wait_for_unchanged(skipped + 5);
    assert_eq!(written_at(checkpoint(&pipeline.storage).unwrap()), idle_since, "five intervals idle, and the checkpoint was written again");
    let file = dir.path().join("later.jsonl");
    std::fs::write(&file, later.join("\n") + "\n").unwrap();
    produce(&topic, &file);
    pipeline.wait_for_checkpoint(Duration::from_secs(120), "310 stories", |c| counter(c, "scored") == 310);
    pipeline.signal("TERM");
    assert!(pipeline.wait(Duration::from_secs(30)).success(), "{}", pipeline.logs());
    assert_eq!(query_one(&pipeline.storage, "SELECT count(DISTINCT id) FROM news"), "310");
}
