//! The reliability suite: things broken on purpose, against the real broker, SMTP server and
//! webhook endpoint. CI runs the short form with the other tests; `scripts/reliability.sh` runs the
//! full form (`BEARWATCH_RELIABILITY=full`: 10 kills during 100 k stories, a 2-minute SMTP outage,
//! 10 k malformed messages, a longer broker outage).

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use bearwatch::rng::Lcg;
use common::servers::{SmtpServer, WebhookServer, free_port};
use common::{
    Broker, DEMO_DATA, LATEST_WINDOWS, Pipeline, ROOT, alter_topic, assert_same_rows, brokers, checkpoint, counter, create_topic_on, create_topic_with,
    produce_to, query, query_one, unique,
};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

fn full() -> bool {
    std::env::var("BEARWATCH_RELIABILITY").is_ok_and(|v| v == "full")
}

/// Short or full size.
fn size<T>(short: T, full_size: T) -> T {
    if full() { full_size } else { short }
}

/// Stories in the `all` windows: each counted once, as a story or as a copy of one.
const ALL_TOTAL: &str = "SELECT CAST(sum(m) AS BIGINT) FROM (SELECT max(n + copies) AS m FROM windows WHERE topic = 'all' GROUP BY window_start)";

/// The bundled Reuters stories, repeated with new ids and times shifted 15 days per copy (in order),
/// until there are `n`.
fn reuters(n: usize) -> String {
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(DEMO_DATA).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let mut out = String::new();
    for i in 0..n {
        let (copy, line) = (i / lines.len(), &lines[i % lines.len()]);
        let mut story = line.clone();
        story["id"] = format!("{}-c{copy}", line["id"].as_str().unwrap()).into();
        let t = chrono::DateTime::parse_from_rfc3339(line["published_at"].as_str().unwrap()).unwrap() + chrono::Duration::days(15 * copy as i64);
        story["published_at"] = t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true).into();
        out.push_str(&story.to_string());
        out.push('\n');
    }
    out
}

fn kafka_config(brokers: &str, topic: &str, group: &str, storage: &str, extra: &str) -> String {
    format!(
        "[source]\ntype = \"kafka\"\nbrokers = \"{brokers}\"\ntopics = [\"{topic}\"]\ngroup_id = \"{group}\"\ndead_letter_topic = \"{topic}.dlq\"\n\
         max_clock_skew = \"1h\"\n[source.properties]\n\"session.timeout.ms\" = \"6000\"\n\
         [window]\nsize = \"1d\"\nallowed_lateness = \"60d\"\n\
         [storage]\npath = \"{storage}\"\ncheckpoint_interval = \"500ms\"\n\
         [run]\nsummary_interval = \"0s\"\nshutdown_timeout = \"10s\"\n{extra}"
    )
}

/// A consumer of `topic`'s dead-letter topic from its start.
fn dead_letter_reader(topic: &str) -> BaseConsumer {
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", unique("dlq-reader"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[&format!("{topic}.dlq")]).unwrap();
    consumer
}

/// Peak resident memory of a process, in MiB (VmHWM).
fn peak_rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status.lines().find_map(|l| l.strip_prefix("VmHWM:")).unwrap().trim().trim_end_matches(" kB").trim().parse().unwrap();
    kb / 1024
}

/// kill -9 at random moments during a replay from Kafka, restarting each time: the windows equal
/// those of an uninterrupted run, each story is in `news` once, and every alert change reaches the
/// webhook (a crash between a send and its record may repeat one, with the same Idempotency-Key).
/// The crashed runs' topic is produced in parts, one more before each run, so that every kill lands
/// before the stream is complete however fast the machine scores: mid-batch or with the part done
/// and windows still open.
#[test]
fn repeated_kill_9_during_a_kafka_replay_loses_nothing_and_counts_nothing_twice() {
    let (total, kills) = (size(3000, 100_000), size(3, 10));
    let dir = tempfile::tempdir().unwrap();
    // One partition: stories arrive in event-time order, so windows close as in the demo (lateness
    // 1 h) and the alert rules, which need closed windows, fire.
    let (whole_topic, topic) = (unique("crash-suite-whole"), unique("crash-suite"));
    create_topic_on(brokers(), &whole_topic, 1);
    create_topic_on(brokers(), &topic, 1);
    let stories = reuters(total);
    let stories: Vec<&str> = stories.lines().collect();
    let produce_part = |part: &[&str]| {
        let file = dir.path().join("part.jsonl");
        std::fs::write(&file, part.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
        produce_to(brokers(), &topic, &file);
    };
    let file = dir.path().join("in.jsonl");
    std::fs::write(&file, stories.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    produce_to(brokers(), &whole_topic, &file);
    let hook = WebhookServer::start();
    std::fs::write(dir.path().join("routes.toml"), "[[routes]]\nreceivers = [\"hook\"]\ngroup_wait = \"0s\"\nrepeat_interval = \"0s\"\n").unwrap();
    // Several alerts to deliver.
    common::loose_rules(dir.path());
    let alerting = format!(
        "[alerts]\nrules = [\"loose.toml\", \"routes.toml\"]\n[[receivers]]\nname = \"log\"\ntype = \"log\"\n\
         [[receivers]]\nname = \"hook\"\ntype = \"webhook\"\nurl = \"http://127.0.0.1:{}/\"\ntimeout = \"2s\"\nrate_limit = 0\n",
        hook.port
    );
    let limit = Duration::from_secs(size(180, 3600));

    // The demo's windows, as the rules were chosen for.
    let in_order = |config: String| {
        config.replace("allowed_lateness = \"60d\"", "allowed_lateness = \"1h\"").replace("size = \"1d\"", "size = \"4h\"\nslide = \"1h\"")
    };
    let mut whole = Pipeline::start(dir.path(), "whole", &in_order(kafka_config(brokers(), &whole_topic, &unique("g"), "whole", "")));
    whole.wait_for_checkpoint(limit, "every story", |c| counter(c, "scored") == total as u64);
    whole.signal("TERM");
    assert!(whole.wait(Duration::from_secs(60)).success());

    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    eprintln!("kill moments seed: {seed}");
    // The kill moments come from this seed; it is printed to replay a failure.
    let mut rng = Lcg(seed);
    let config = in_order(kafka_config(brokers(), &topic, &unique("g"), "crashed", &alerting));
    let parts: Vec<&[&str]> = stories.chunks(total.div_ceil(kills + 1)).collect();
    let mut produced = 0;
    for (round, part) in parts[..kills].iter().enumerate() {
        produce_part(part);
        produced += part.len() as u64;
        let mut run = Pipeline::start(dir.path(), &format!("run{round}"), &config);
        // A random point in what is there to score, then a short random moment after it.
        let before = checkpoint(&dir.path().join("crashed")).map_or(0, |c| counter(&c, "scored"));
        let target = before + 1 + rng.below((produced - before) as usize) as u64;
        run.wait_for_checkpoint(limit, "progress", |c| counter(c, "scored") >= target);
        std::thread::sleep(Duration::from_millis(rng.below(300) as u64));
        run.signal("KILL");
        run.wait(Duration::from_secs(10));
        eprintln!("kill {round}: after {target} of {produced} produced stories were checkpointed");
    }
    for part in &parts[kills..] {
        produce_part(part);
    }
    let mut last = Pipeline::start(dir.path(), "last", &config);
    last.wait_for_checkpoint(limit, "every story", |c| counter(c, "scored") >= total as u64);
    last.signal("TERM");
    assert!(last.wait(Duration::from_secs(60)).success(), "{}", last.logs());

    let store = &last.storage;
    assert_eq!(query_one(store, "SELECT count(*) FROM news"), total.to_string());
    assert_eq!(query_one(store, "SELECT count(DISTINCT id) FROM news"), total.to_string());
    assert_same_rows(&query(store, LATEST_WINDOWS), &query(&whole.storage, LATEST_WINDOWS), "windows");

    // Every alert change went out: the webhook saw each one's key; repeats only with the same key.
    let expected: Vec<String> =
        query(store, "SELECT DISTINCT alert_id || '/' || state || '/hook' FROM alerts").into_iter().map(|r| r[0].clone()).collect();
    assert!(!expected.is_empty(), "the replay fired no alert; nothing was tested");
    let mut received: BTreeMap<String, usize> = BTreeMap::new();
    for (head, _) in hook.requests.lock().unwrap().iter() {
        let key = head.lines().find_map(|l| l.to_ascii_lowercase().strip_prefix("idempotency-key:").map(|k| k.trim().to_string())).unwrap();
        *received.entry(key.split('#').next().unwrap().to_string()).or_default() += 1;
    }
    let lost: Vec<&String> = expected.iter().filter(|k| !received.contains_key(*k)).collect();
    assert!(lost.is_empty(), "notifications lost: {lost:?}");
    let repeats: usize = received.values().map(|n| n - 1).sum();
    eprintln!("{kills} kills, {} alert changes notified, {repeats} repeated (same key)", expected.len());
    assert!(repeats <= kills, "more repeats ({repeats}) than crashes ({kills})");
}

/// The broker stops mid-stream and comes back on the same log dir: the pipeline waits, resumes from
/// its committed offsets, and every story is processed once. Two thirds of the stories are there
/// before the stop and the rest are produced after the restart, so the stream goes on across the
/// restart however fast the pipeline read the first part.
#[test]
fn a_broker_restart_mid_stream_loses_nothing() {
    let total = size(3000, 20_000);
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let topic = unique("restart");
    create_topic_on(&broker.brokers(), &topic, 3);
    let stories = reuters(total);
    let lines: Vec<&str> = stories.lines().collect();
    let (before, after) = lines.split_at(total * 2 / 3);
    let (before_file, after_file) = (dir.path().join("before.jsonl"), dir.path().join("after.jsonl"));
    std::fs::write(&before_file, before.join("\n") + "\n").unwrap();
    std::fs::write(&after_file, after.join("\n") + "\n").unwrap();
    produce_to(&broker.brokers(), &topic, &before_file);

    // One remembered id: only the positions the pipeline keeps, not id de-duplication, can stop
    // stories re-read after the restart from being stored twice.
    let config = kafka_config(&broker.brokers(), &topic, &unique("g"), "store", "")
        .replace("allowed_lateness = \"60d\"\n", "allowed_lateness = \"60d\"\ndedup_max_ids = 1\n");
    let mut run = Pipeline::start(dir.path(), "p", &config);
    run.wait_for_checkpoint(Duration::from_secs(180), "some stories", |c| counter(c, "scored") >= (total / 5) as u64);
    broker.run("stop", false);
    let down_at = counter(&checkpoint(&run.storage).unwrap(), "scored");
    // Longer than session.timeout.ms: the member loses its partitions, and its commit on revocation
    // fails, so the group hands back offsets older than what it processed.
    std::thread::sleep(Duration::from_secs(size(10, 30)));
    assert!(run.child.try_wait().unwrap().is_none(), "the pipeline gave up while the broker was down\n{}", run.logs());
    broker.run("start", true);
    produce_to(&broker.brokers(), &topic, &after_file);
    run.wait_for_checkpoint(Duration::from_secs(size(180, 1200)), "every story", |c| counter(c, "scored") >= total as u64);
    run.signal("TERM");
    assert!(run.wait(Duration::from_secs(60)).success(), "{}", run.logs());
    eprintln!("{down_at} of {} stories before the restart scored when the broker stopped", before.len());
    assert_eq!(query_one(&run.storage, "SELECT count(*) FROM news"), total.to_string(), "{}", run.logs());
    assert_eq!(query_one(&run.storage, "SELECT count(DISTINCT id) FROM news"), total.to_string());
    assert_eq!(
        query_one(&run.storage, ALL_TOTAL),
        total.to_string(),
        "late stories per partition: {}\n{}",
        query_one(&run.storage, "SELECT string_agg(concat(kafka_partition, ':', n, ' from offset ', o, ' at ', t), ', ') FROM (SELECT kafka_partition, count(*) n, min(kafka_offset) o, min(published_at) t FROM late GROUP BY 1)"),
        run.logs()
    );
}

/// SMTP is down while the demo's alerts fire; once it is back every email arrives exactly once.
#[test]
fn an_smtp_outage_during_a_spike_delays_emails_but_delivers_each_once() {
    let outage = Duration::from_secs(size(10, 120));
    let dir = tempfile::tempdir().unwrap();
    let smtp_port = free_port();
    std::fs::write(dir.path().join("routes.toml"), "[[routes]]\nreceivers = [\"mail\"]\ngroup_wait = \"0s\"\nrepeat_interval = \"0s\"\n").unwrap();
    let config = format!(
        "[source]\ntype = \"file\"\npath = \"{DEMO_DATA}\"\n[window]\nsize = \"4h\"\nslide = \"1h\"\nallowed_lateness = \"1h\"\n\
         [storage]\npath = \"store\"\ncheckpoint_interval = \"1s\"\n[run]\nsummary_interval = \"0s\"\nkeep_serving = true\nshutdown_timeout = \"60s\"\n\
         [server]\nhttp = \"127.0.0.1:{}\"\n\
         [alerts]\nrules = [\"{ROOT}/alerts/default.toml\", \"routes.toml\"]\n\
         [[receivers]]\nname = \"log\"\ntype = \"log\"\n\
         [[receivers]]\nname = \"mail\"\ntype = \"email\"\nsmtp_host = \"127.0.0.1\"\nsmtp_port = {smtp_port}\ntls = \"none\"\n\
         from = \"bearwatch <b@example.com>\"\nto = [\"desk@example.com\"]\ntimeout = \"2s\"\n",
        free_port()
    );
    let mut run = Pipeline::start(dir.path(), "p", &config);
    let outbox = dir.path().join("store/outbox.jsonl");
    let deadline = Instant::now() + Duration::from_secs(180);
    while !std::fs::read_to_string(&outbox).unwrap_or_default().contains("\"event\":\"failed\"") {
        assert!(Instant::now() < deadline, "no failed delivery\n{}", run.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    let failed_at = Instant::now();
    std::thread::sleep(outage);
    let smtp = SmtpServer::start(smtp_port, &dir.path().join("mail"));
    let back_at = Instant::now();
    // The replay is over (keep_serving) and the outbox holds no due notification any more.
    let pending = || {
        let text = std::fs::read_to_string(&outbox).unwrap_or_default();
        let queued = text.matches("\"event\":\"queued\"").count();
        let done = text.matches("\"event\":\"sent\"").count() + text.matches("\"event\":\"dropped\"").count();
        queued.saturating_sub(done)
    };
    let deadline = Instant::now() + Duration::from_secs(150);
    while !(std::fs::read_to_string(&run.stderr).unwrap_or_default().contains("still serving") && pending() == 0) {
        assert!(Instant::now() < deadline, "emails still pending after the outage: {}\n{}", pending(), run.logs());
        std::thread::sleep(Duration::from_millis(200));
    }
    run.signal("TERM");
    assert!(run.wait(Duration::from_secs(90)).success(), "{}", run.logs());

    let changes: usize = query_one(&run.storage, "SELECT count(*) FROM alerts").parse().unwrap();
    let mails = smtp.messages();
    let mut ids: Vec<&str> = mails.iter().map(|m| m["message_id"].as_str().unwrap_or_default()).collect();
    ids.sort();
    ids.dedup();
    assert!(changes > 0);
    assert_eq!(mails.len(), changes, "one email per alert change");
    assert_eq!(ids.len(), mails.len(), "no email twice");
    eprintln!(
        "{changes} emails, first failure {:.0} s before SMTP returned, all delivered {:.0} s after",
        (back_at - failed_at).as_secs_f64(),
        back_at.elapsed().as_secs_f64()
    );
}

/// Malformed messages of twelve kinds interleaved with good stories: each bad one is in the dead-letter
/// topic with its reason, each good one is scored, and memory stays bounded.
#[test]
fn malformed_messages_of_every_kind_go_to_the_dead_letter_topic_and_the_rest_is_processed() {
    let (good, bad) = (size(1000, 10_000), size(1000, 10_000));
    let dir = tempfile::tempdir().unwrap();
    let topic = unique("malformed");
    create_topic_on(brokers(), &topic, 3);
    let stories: Vec<String> = reuters(good).lines().map(str::to_string).collect();
    let bad_kinds: [(&str, Vec<u8>); 14] = [
        ("json", b"{\"id\": \"x\", ".to_vec()),
        ("not_an_object", b"[1, 2, 3]".to_vec()),
        ("missing_field", br#"{"id":"m","published_at":"1987-03-02T10:00:00Z"}"#.to_vec()),
        ("wrong_type", br#"{"id":7,"published_at":"1987-03-02T10:00:00Z","headline":"x"}"#.to_vec()),
        ("bad_timestamp", br#"{"id":"t","published_at":"yesterday","headline":"x"}"#.to_vec()),
        ("headline_length", format!(r#"{{"id":"h","published_at":"1987-03-02T10:00:00Z","headline":"{}"}}"#, "x".repeat(2100)).into_bytes()),
        ("invalid_utf8", b"{\"id\":\"u\",\"headline\":\"\xff\xfe\"}".to_vec()),
        ("empty", Vec::new()),
        ("too_large", format!(r#"{{"id":"l","published_at":"1987-03-02T10:00:00Z","headline":"x","body":"{}"}}"#, "y".repeat(70_000)).into_bytes()),
        ("timestamp_out_of_range", br#"{"id":"f","published_at":"2999-01-01T00:00:00Z","headline":"x"}"#.to_vec()),
        ("id_length", format!(r#"{{"id":"{}","published_at":"1987-03-02T10:00:00Z","headline":"x"}}"#, "i".repeat(300)).into_bytes()),
        ("tickers", format!(r#"{{"id":"k","published_at":"1987-03-02T10:00:00Z","headline":"x","tickers":{:?}}}"#, (0..1000).map(|i| format!("T{i}")).collect::<Vec<_>>()).into_bytes()),
        // A ticker or an id that would split a log line or forge a mail header.
        ("tickers", br#"{"id":"c","published_at":"1987-03-02T10:00:00Z","headline":"x","tickers":["XOM\r\nBcc: x@example.com"]}"#.to_vec()),
        ("id_control", br#"{"id":"c\r\nforged=1","published_at":"1987-03-02T10:00:00Z","headline":"x"}"#.to_vec()),
    ];
    let producer: BaseProducer = rdkafka::ClientConfig::new().set("bootstrap.servers", brokers()).create().unwrap();
    let mut sent_kinds: BTreeMap<&str, usize> = BTreeMap::new();
    let (mut next_good, mut next_bad) = (0, 0);
    while next_good < good || next_bad < bad {
        // Interleaved: a bad message after every good one (in partition order).
        if next_good < good {
            let line = &stories[next_good];
            while producer.send(BaseRecord::to(&topic).key(&next_good.to_string()).payload(line.as_bytes())).is_err() {
                producer.poll(Duration::from_millis(10));
            }
            next_good += 1;
        }
        if next_bad < bad {
            let (kind, payload) = &bad_kinds[next_bad % bad_kinds.len()];
            while producer.send(BaseRecord::to(&topic).key(&format!("bad{next_bad}")).payload(payload)).is_err() {
                producer.poll(Duration::from_millis(10));
            }
            *sent_kinds.entry(kind).or_default() += 1;
            next_bad += 1;
        }
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(30)).unwrap();

    let config = kafka_config(brokers(), &topic, &unique("g"), "store", "").replace("max_clock_skew", "max_message_bytes = 65536\nmax_clock_skew");
    let mut run = Pipeline::start(dir.path(), "p", &config);
    run.wait_for_checkpoint(Duration::from_secs(size(180, 1800)), "every message", |c| {
        counter(c, "scored") + counter(c, "dead_lettered") >= (good + bad) as u64
    });
    let peak = peak_rss_mib(run.child.id());
    run.signal("TERM");
    assert!(run.wait(Duration::from_secs(60)).success(), "{}", run.logs());
    let saved = checkpoint(&run.storage).unwrap();
    assert_eq!((counter(&saved, "scored"), counter(&saved, "dead_lettered")), (good as u64, bad as u64));
    assert_eq!(query_one(&run.storage, "SELECT count(DISTINCT id) FROM news"), good.to_string());

    let consumer = dead_letter_reader(&topic);
    let mut dead: BTreeMap<String, usize> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while dead.values().sum::<usize>() < bad && Instant::now() < deadline {
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(200)) {
            let kind = message
                .headers()
                .and_then(|h| h.iter().find(|h| h.key == "error.kind").and_then(|h| h.value.map(|v| String::from_utf8_lossy(v).into_owned())))
                .expect("every dead letter says why");
            *dead.entry(kind).or_default() += 1;
        }
    }
    let expected: BTreeMap<String, usize> = sent_kinds.iter().map(|(k, n)| (k.to_string(), *n)).collect();
    assert_eq!(dead, expected, "dead letters by kind");
    eprintln!("{good} good, {bad} malformed of {} kinds; peak RSS {peak} MiB", expected.len());
    assert!(peak < 1024, "peak RSS {peak} MiB");
}

/// A message the broker refuses (larger than its topic allows) fails the flush after it, naming the
/// topic, and only that flush: a producer's later messages start clean.
#[test]
fn a_delivery_the_broker_refuses_fails_the_flush_after_it_and_only_that_one() {
    let topic = unique("small-messages");
    create_topic_with(brokers(), &topic, 1, &[("max.message.bytes", "1000")]);
    let output = bearwatch::source::kafka::Output::connect(brokers(), &BTreeMap::new()).unwrap();
    output.send(&topic, b"k", &[b'x'; 5000], None).unwrap();
    let error = output.flush(Duration::from_secs(30)).unwrap_err().to_string();
    assert!(error.contains("1 messages were not delivered; the first to") && error.contains(&topic), "{error}");
    output.send(&topic, b"k", b"small", None).unwrap();
    output.flush(Duration::from_secs(30)).unwrap();
}

/// The dead-letter topic refuses a dead letter (a topic setting smaller than the malformed message):
/// the run ends with the reason and commits nothing past it, and once the topic takes it, the next
/// run delivers it, every story counted once.
#[test]
fn a_dead_letter_the_topic_refuses_ends_the_run_and_is_delivered_after_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let topic = unique("refused-dlq");
    create_topic_on(brokers(), &topic, 1);
    create_topic_with(brokers(), &format!("{topic}.dlq"), 1, &[("max.message.bytes", "2000")]);
    let good = 200;
    let mut input = reuters(good);
    // Malformed (no headline), and larger than the dead-letter topic allows.
    let bad = format!("{{\"id\":\"bad\",\"published_at\":\"1987-03-02T10:00:00Z\",\"note\":\"{}\"}}\n", "z".repeat(5000));
    input.insert_str(input.match_indices('\n').nth(good / 2).unwrap().0 + 1, &bad);
    std::fs::write(dir.path().join("in.jsonl"), &input).unwrap();
    produce_to(brokers(), &topic, &dir.path().join("in.jsonl"));
    let config = kafka_config(brokers(), &topic, &unique("g"), "store", "");

    let mut run = Pipeline::start(dir.path(), "p", &config);
    let status = run.wait(Duration::from_secs(120));
    let logs = run.logs();
    assert!(!status.success(), "the run ends\n{logs}");
    assert!(logs.contains("1 messages were not delivered; the first to") && logs.contains(&format!("{topic}.dlq")), "{logs}");
    let committed = checkpoint(&run.storage).map_or(0, |c| counter(&c, "dead_lettered"));
    assert_eq!(committed, 0, "nothing committed past the refused dead letter");

    alter_topic(brokers(), &format!("{topic}.dlq"), &[("max.message.bytes", "1048588")]);
    let mut run = Pipeline::start(dir.path(), "p", &config);
    run.wait_for_checkpoint(Duration::from_secs(120), "every message", |c| counter(c, "scored") + counter(c, "dead_lettered") >= good as u64 + 1);
    run.signal("TERM");
    assert!(run.wait(Duration::from_secs(60)).success(), "{}", run.logs());
    let saved = checkpoint(&run.storage).unwrap();
    assert_eq!((counter(&saved, "scored"), counter(&saved, "dead_lettered")), (good as u64, 1));
    assert_eq!(query_one(&run.storage, "SELECT count(*) FROM news"), good.to_string(), "every story once");
    let consumer = dead_letter_reader(&topic);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut letters = Vec::new();
    while letters.is_empty() && Instant::now() < deadline {
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(200)) {
            letters.push(message.payload().map(<[u8]>::len).unwrap_or(0));
        }
    }
    assert_eq!(letters, vec![bad.len() - 1], "the dead letter, whole");
}

/// A slow classifier (one thread, batches of two) behind a backlog: the source pauses, memory stays
/// bounded, and the consumer lag comes back to zero.
#[test]
fn a_slow_classifier_pauses_consumption_with_bounded_memory_and_the_lag_recovers() {
    let total = size(2000, 20_000);
    let dir = tempfile::tempdir().unwrap();
    let topic = unique("slow");
    create_topic_on(brokers(), &topic, 2);
    let file = dir.path().join("in.jsonl");
    std::fs::write(&file, reuters(total)).unwrap();
    produce_to(brokers(), &topic, &file);
    let http = free_port();
    let config = kafka_config(brokers(), &topic, &unique("g"), "store", &format!("[model]\nthreads = 1\nmax_batch_size = 2\nmax_queued = 64\n[server]\nhttp = \"127.0.0.1:{http}\"\n"))
        .replace("\"session.timeout.ms\" = \"6000\"", "\"session.timeout.ms\" = \"6000\"\n\"statistics.interval.ms\" = \"500\"");
    let mut run = Pipeline::start(dir.path(), "p", &config);
    let metric = |text: &str, name: &str| -> f64 {
        text.lines().filter(|l| l.starts_with(name)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
    };
    let scrape = || ureq::get(format!("http://127.0.0.1:{http}/metrics")).call().ok().and_then(|mut r| r.body_mut().read_to_string().ok());
    let (mut saw_paused, mut max_lag, mut last_lag) = (false, 0.0f64, String::new());
    let deadline = Instant::now() + Duration::from_secs(size(300, 3600));
    loop {
        if let Some(text) = scrape() {
            saw_paused |= metric(&text, "bearwatch_source_paused") == 1.0;
            max_lag = max_lag.max(metric(&text, "bearwatch_kafka_consumer_lag{"));
            last_lag = text.lines().filter(|l| l.starts_with("bearwatch_kafka_consumer_lag{")).collect::<Vec<_>>().join("\n");
            let done = checkpoint(&run.storage).is_some_and(|c| counter(&c, "scored") >= total as u64);
            if done && metric(&text, "bearwatch_kafka_consumer_lag{") == 0.0 && text.contains("bearwatch_kafka_consumer_lag{") {
                break;
            }
        }
        if let Some(status) = run.child.try_wait().unwrap() {
            panic!("the pipeline exited ({status}) before it caught up\n{}", run.logs());
        }
        let scored = checkpoint(&run.storage).map(|c| counter(&c, "scored"));
        assert!(
            Instant::now() < deadline,
            "never caught up (max lag {max_lag}; checkpointed scored {scored:?} of {total}; last lag:\n{last_lag})\n{}",
            run.logs()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let peak = peak_rss_mib(run.child.id());
    run.signal("TERM");
    assert!(run.wait(Duration::from_secs(60)).success(), "{}", run.logs());
    assert!(saw_paused, "the source never paused");
    assert!(max_lag > 0.0, "no backlog was ever measured");
    assert_eq!(query_one(&run.storage, "SELECT count(DISTINCT id) FROM news"), total.to_string());
    eprintln!("{total} stories; the source paused; max lag {max_lag}, back to 0; peak RSS {peak} MiB");
    assert!(peak < 1024, "peak RSS {peak} MiB");
}

/// Runs `bearwatch run` on `dir/p.toml` with `dir/disk` a 16 MiB filesystem of its own (a tmpfs in
/// a mount namespace of the process, so no root is needed), filled to the last byte before the
/// pipeline starts. `None` where this machine cannot make one (no user namespaces).
fn start_on_a_full_disk(dir: &std::path::Path, config: &str) -> Option<Pipeline> {
    let unshare = |script: &str| {
        let mut command = Command::new("unshare");
        command.args(["--user", "--map-root-user", "--mount", "sh", "-c", script]);
        command
    };
    let probe = unshare("mkdir -p /tmp/bw-probe && mount -t tmpfs -o size=1m tmpfs /tmp/bw-probe").output();
    if !probe.as_ref().is_ok_and(|o| o.status.success()) {
        return None;
    }
    std::fs::create_dir_all(dir.join("disk")).unwrap();
    std::fs::write(dir.join("p.toml"), config).unwrap();
    let (stdout, stderr) = (dir.join("p.stdout"), dir.join("p.stderr"));
    let child = unshare("mount -t tmpfs -o size=16m tmpfs disk && { cat /dev/zero > disk/filler 2>/dev/null; exec \"$0\" run --pipeline p.toml; }")
        .arg(env!("CARGO_BIN_EXE_bearwatch"))
        .current_dir(dir)
        .env("BEARWATCH_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&stdout).unwrap())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    Some(Pipeline { child, storage: dir.join("disk/store"), stdout, stderr })
}

/// The storage's disk is full from the start (a dead-letter file, parts, the checkpoint, the
/// outbox, the silences and the analysts' journal all live there): the pipeline waits, says so,
/// refuses labels and silences with a 503 to send again, and once space is freed it finishes: every
/// story counted once, every dead letter written whole and once, every alert change notified once.
#[test]
fn a_full_disk_pauses_the_pipeline_which_then_resumes_losing_nothing_and_repeating_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // Bad lines between the stories, more than the dead-letter file's buffer, so its writes hit the full disk.
    let bad = 200;
    let mut input = String::new();
    for (i, line) in std::fs::read_to_string(DEMO_DATA).unwrap().lines().enumerate() {
        input.push_str(line);
        input.push('\n');
        if i % 15 == 0 && i / 15 < bad {
            input.push_str(&format!("{{\"id\":\"bad-{i}\",\"headline\":{}\n", "\"x".repeat(300)));
        }
    }
    std::fs::write(dir.path().join("in.jsonl"), input).unwrap();
    std::fs::write(dir.path().join("routes.toml"), "[[routes]]\nreceivers = [\"hook\"]\ngroup_wait = \"0s\"\nrepeat_interval = \"0s\"\n").unwrap();
    let hook = WebhookServer::start();
    let http = free_port();
    let config = format!(
        "[source]\ntype = \"file\"\npath = \"in.jsonl\"\n[window]\nsize = \"4h\"\nslide = \"1h\"\nallowed_lateness = \"1h\"\n\
         [storage]\npath = \"disk/store\"\ncheckpoint_interval = \"1s\"\n[run]\nsummary_interval = \"0s\"\nkeep_serving = true\nshutdown_timeout = \"30s\"\n\
         [server]\nhttp = \"127.0.0.1:{http}\"\n[alerts]\nrules = [\"{ROOT}/alerts/default.toml\", \"routes.toml\"]\n\
         [[receivers]]\nname = \"log\"\ntype = \"log\"\n[[receivers]]\nname = \"hook\"\ntype = \"webhook\"\nurl = \"http://127.0.0.1:{}/alerts\"\ntimeout = \"2s\"\n",
        hook.port
    );
    let Some(mut run) = start_on_a_full_disk(dir.path(), &config) else {
        eprintln!("skipped: this machine cannot mount a filesystem in a user namespace (`unshare --user --mount`)");
        return;
    };
    let api = common::api::Api::new(&format!("http://127.0.0.1:{http}"));
    let gauge = |name: &str| -> Option<f64> {
        let (status, _, text) = api.raw("GET", "/metrics", &[], None).ok()?;
        (status == 200).then_some(())?;
        text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while gauge("bearwatch_storage_unavailable") != Some(1.0) {
        assert!(Instant::now() < deadline && run.child.try_wait().unwrap().is_none(), "the full disk was not reported\n{}", run.logs());
        std::thread::sleep(Duration::from_millis(200));
    }
    let (status, _, ready) = api.raw("GET", "/ready", &[], None).unwrap();
    assert_eq!(status, 200, "still ready (queries answer): {ready}");
    assert!(ready.starts_with("ready\nwarning: storage unavailable since ") && ready.contains("No space left"), "/ready says why: {ready}");
    let label = r#"{"text": "Oil prices fall sharply", "head": "sentiment", "label": "negative"}"#;
    let (status, _, body) = api.raw("POST", "/api/feedback/labels", &[("Content-Type", "application/json")], Some(label)).unwrap();
    assert_eq!(status, 503, "a label on a full disk: {body}");
    assert!(body.contains("No space left"), "{body}");
    let now = chrono::Utc::now();
    let silence = serde_json::json!({"match": {"topic": "energy"}, "starts_at": now, "ends_at": now + chrono::Duration::hours(1), "comment": "disk"}).to_string();
    let (status, _, body) = api.raw("POST", "/api/silences", &[("Content-Type", "application/json")], Some(&silence)).unwrap();
    assert_eq!(status, 503, "a silence on a full disk: {body}");
    assert_eq!(api.raw("GET", "/api/silences", &[], None).unwrap().2.trim(), "[]", "and none in effect");
    // The files as the pipeline sees them, through its own mount namespace.
    let disk = std::path::PathBuf::from(format!("/proc/{}/root{}", run.child.id(), dir.path().join("disk").display()));
    std::fs::remove_file(disk.join("filler")).unwrap();
    let (status, _, body) = api.raw("POST", "/api/feedback/labels", &[("Content-Type", "application/json")], Some(label)).unwrap();
    assert_eq!(status, 201, "the same label once there is room: {body}");
    let (status, _, body) = api.raw("POST", "/api/silences", &[("Content-Type", "application/json")], Some(&silence)).unwrap();
    assert_eq!(status, 201, "the same silence once there is room: {body}");

    let outbox = disk.join("store/outbox.jsonl");
    let pending = || {
        let text = std::fs::read_to_string(&outbox).unwrap_or_default();
        let queued = text.matches("\"event\":\"queued\"").count();
        queued.saturating_sub(text.matches("\"event\":\"sent\"").count() + text.matches("\"event\":\"dropped\"").count())
    };
    let deadline = Instant::now() + Duration::from_secs(240);
    while !(std::fs::read_to_string(&run.stderr).unwrap_or_default().contains("still serving") && pending() == 0) {
        assert!(Instant::now() < deadline && run.child.try_wait().unwrap().is_none(), "not finished after the disk had room\n{}", run.logs());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(gauge("bearwatch_storage_unavailable"), Some(0.0));
    assert_eq!(api.raw("GET", "/ready", &[], None).unwrap().2, "ready\n", "the warning ends with the outage");
    let stories = std::fs::read_to_string(DEMO_DATA).unwrap().lines().count();
    let counted = api.sql(None, "SELECT count(*) AS n, count(DISTINCT id) AS d FROM news");
    assert_eq!((counted[0]["n"].as_u64(), counted[0]["d"].as_u64()), (Some(stories as u64), Some(stories as u64)), "every story once");
    let letters = std::fs::read_to_string(disk.join("store/dead-letter.jsonl")).unwrap();
    let mut ids: Vec<String> = letters
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap_or_else(|e| panic!("a torn dead letter ({e}): {l:.200}"))["payload"].as_str().unwrap()[..20].to_string())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!((letters.lines().count(), ids.len()), (bad, bad), "every bad line once");
    let changes = api.sql(None, "SELECT count(*) AS n FROM alerts")[0]["n"].as_u64().unwrap() as usize;
    let requests = hook.requests.lock().unwrap().clone();
    let mut keys: Vec<String> = requests.iter().map(|(_, a)| format!("{}/{}", a["alert_id"], a["state"])).collect();
    keys.sort();
    keys.dedup();
    assert!(changes > 0, "the demo data raises alerts");
    assert_eq!((requests.len(), keys.len()), (changes, changes), "each alert change notified once");
    let waits = std::fs::read_to_string(&run.stderr).unwrap_or_default().matches("storage unavailable").count();
    eprintln!("{stories} stories, {bad} dead letters, {changes} alert changes notified once; {waits} writes waited for the disk");
    run.signal("TERM");
    assert!(run.wait(Duration::from_secs(60)).success(), "{}", run.logs());
}
