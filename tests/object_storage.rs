//! Tables, checkpoint and journals on a real S3-compatible server (tests/s3_server.py): a pipeline
//! killed with -9 mid-stream and restarted loses and doubles nothing and its windows equal a local
//! run's; SQL (CLI and HTTP) reads the bucket; two writers on one prefix cannot both commit.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use bearwatch::config::env::EnvString;
use bearwatch::feedback::JournalTail;
use bearwatch::storage::{Location, S3Config, Storage, StorageError, Table};
use common::api::Api;
use common::servers::{Relay, S3Server, free_port};
use common::{LATEST_WINDOWS, Pipeline, ROOT, stories};

fn bearwatch(s3: &S3Server, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_bearwatch")).args(args).envs(s3.env()).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn sql(s3: &S3Server, storage: &str, query: &str) -> String {
    let (code, out, err) = bearwatch(s3, &["sql", "--storage", storage, "--format", "csv", query]);
    assert_eq!(code, 0, "{query}: {err}");
    out
}

/// Stories instance `name` under `desk/` had counted at its last checkpoint.
fn scored_by(s3: &S3Server, name: &str) -> u64 {
    s3.checkpoint("desk", Some(name)).map_or(0, |checkpoint| checkpoint["counters"]["scored"].as_u64().unwrap_or(0))
}

fn config(news: &str, storage: &str, extra: &str) -> String {
    format!(
        "[source]\ntype = \"file\"\npath = \"{news}\"\nspeed = 100000\n[window]\nsize = \"4h\"\nslide = \"1h\"\nallowed_lateness = \"1h\"\n\
         [storage]\npath = \"{storage}\"\ncheckpoint_interval = \"300ms\"\n{extra}\n\
         [alerts]\nrules = [\"{ROOT}/alerts/default.toml\"]\n[[receivers]]\nname = \"log\"\ntype = \"log\"\n"
    )
}

#[test]
fn a_pipeline_on_s3_killed_mid_stream_loses_and_doubles_nothing_and_sql_reads_the_bucket() {
    let total = 1500;
    let s3 = S3Server::start("bearwatch");
    let dir = tempfile::tempdir().unwrap();
    let news = dir.path().join("news.jsonl");
    std::fs::write(&news, stories(total)).unwrap();
    let news = news.to_str().unwrap();

    // The reference: the same stories into a local folder, uninterrupted.
    let mut whole = Pipeline::start(dir.path(), "whole", &config(news, "whole", ""));
    assert!(whole.wait(Duration::from_secs(300)).success(), "{}", whole.logs());

    let remote = "s3://bearwatch/market";
    let settings = format!("local_path = \"market-local\"\n{}", s3.storage_settings());
    let mut first = Pipeline::start(dir.path(), "first", &config(news, remote, &settings));
    let deadline = Instant::now() + Duration::from_secs(300);
    let scored = |c: &serde_json::Value| c["counters"]["scored"].as_u64().unwrap_or(0);
    loop {
        if s3.checkpoint("market", None).is_some_and(|c| scored(&c) >= 200) {
            break;
        }
        assert!(first.child.try_wait().unwrap().is_none(), "the pipeline ended before a checkpoint on S3\n{}", first.logs());
        assert!(Instant::now() < deadline, "no checkpoint on S3\n{}", first.logs());
        std::thread::sleep(Duration::from_millis(20));
    }
    first.signal("KILL");
    first.wait(Duration::from_secs(10));
    let at_kill = scored(&s3.checkpoint("market", None).unwrap());
    assert!(at_kill < total as u64, "the kill came after the last story ({at_kill}); nothing was interrupted");

    // Restarted with the HTTP server kept up: /sql reads the bucket too.
    let http = free_port();
    let serving = format!("{settings}[run]\nkeep_serving = true\nshutdown_timeout = \"2s\"\n[server]\nhttp = \"127.0.0.1:{http}\"\n");
    let mut second = Pipeline::start(dir.path(), "second", &config(news, remote, &serving));
    loop {
        if s3.checkpoint("market", None).is_some_and(|c| scored(&c) >= total as u64) {
            break;
        }
        assert!(second.child.try_wait().unwrap().is_none(), "the restart ended early\n{}", second.logs());
        assert!(Instant::now() < deadline, "the restart did not finish\n{}", second.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
    let api = Api::new(&format!("http://127.0.0.1:{http}"));
    let rows = api.sql(None, "SELECT count(*) AS n, count(DISTINCT id) AS ids FROM news");
    assert_eq!((rows[0]["n"].as_u64(), rows[0]["ids"].as_u64()), (Some(total as u64), Some(total as u64)), "over HTTP: {rows:?}");
    // The object-store metrics as Prometheus's tools read them (tests/ops.rs checks the others).
    let (_, _, metrics) = api.raw("GET", "/metrics", &[], None).unwrap();
    assert!(metrics.contains("bearwatch_object_store_requests_total{op=\"put\"}"), "{metrics}");
    let others: Vec<&str> = bearwatch::telemetry::METRICS.iter().map(|m| m.0).filter(|n| !n.starts_with("bearwatch_object_store_")).collect();
    common::check_with_prometheus_tools(&metrics, &others);
    second.signal("TERM");
    assert!(second.wait(Duration::from_secs(60)).success(), "{}", second.logs());

    assert_eq!(sql(&s3, remote, "SELECT count(*) AS n, count(DISTINCT id) AS ids FROM news"), format!("n,ids\n{total},{total}\n"));
    let local = sql(&s3, dir.path().join("whole").to_str().unwrap(), LATEST_WINDOWS);
    assert!(local.lines().count() > 50, "{local}");
    // Equal counts; the mean within the model's batch invariance (a restart forms other batches).
    let restarted = sql(&s3, remote, LATEST_WINDOWS);
    let same = |a: &str, b: &str| {
        let (a, b): (Vec<&str>, Vec<&str>) = (a.split(',').collect(), b.split(',').collect());
        let mean = |row: &[&str]| row.last().and_then(|m| m.parse::<f64>().ok());
        a[..a.len() - 1] == b[..b.len() - 1] && (a == b || matches!((mean(&a), mean(&b)), (Some(x), Some(y)) if (x - y).abs() < 1e-4))
    };
    let differ: Vec<(&str, &str)> = restarted.lines().zip(local.lines()).filter(|(a, b)| !same(a, b)).take(5).collect();
    assert!(
        differ.is_empty() && restarted.lines().count() == local.lines().count(),
        "the windows after kill -9 and restart differ from an uninterrupted run's ({} rows against {}): {differ:?}",
        restarted.lines().count(),
        local.lines().count()
    );
    // The parts and the checkpoint are plain objects that any engine reads: the layout is the local
    // one. Small parts were merged after checkpoints (`part-<first>-<last>.parquet`), and once the
    // process is gone no merged input is left beside its merge (a merge deletes them; a start
    // deletes what a crash left), so a plain glob reads each row once.
    let parts = s3.list("market/news");
    assert!(parts.iter().any(|k| k.starts_with("market/news/part-00000000") && s3.get(k).is_some_and(|b| b.starts_with(b"PAR1"))), "{parts:?}");
    assert!(parts.iter().any(|k| k.matches('-').count() == 2), "no merged part: {parts:?}");
    assert!(common::unmerged_inputs(&parts).is_empty(), "{parts:?}");
    // The files only this process uses stay on its disk.
    assert!(!dir.path().join("market-local").join("checkpoint.json").exists());
}

#[test]
fn journals_on_s3_take_analysts_labels_and_sql_reads_them() {
    let s3 = S3Server::start("journals");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("review.jsonl");
    common::write_stock_split_review(&file, &["two-for-one", "three-for-one"]);
    let storage = "s3://journals/desk";
    let (code, _, err) = bearwatch(&s3, &["feedback", "import", "--storage", storage, "--analyst", "ana", file.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("s3://journals/desk/label_feedback"), "{err}");
    let judged = sql(&s3, storage, "SELECT count(*) AS n, min(analyst) AS analyst FROM label_feedback");
    let lines = std::fs::read_to_string(&file).unwrap().lines().filter(|l| !l.trim().is_empty()).count();
    assert_eq!(judged, format!("n,analyst\n{lines},ana\n"));

    // Their files merge by hour and then by day (rounds run as if that much later), on the real
    // server's conditional PUTs; SQL and the feedback tail read every label once throughout.
    let (code, _, err) = bearwatch(&s3, &["feedback", "import", "--storage", storage, "--analyst", "bo", file.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let location = Location::parse(storage, &s3.settings()).unwrap();
    let files = || bearwatch::storage::journal_files(&location, Table::LabelFeedback).unwrap();
    assert_eq!(files().len(), 2);
    let mut tail = JournalTail::new(&location);
    assert_eq!(tail.new_rows().unwrap().len(), 2 * lines);
    let later = |hours| chrono::Utc::now() + chrono::Duration::hours(hours);
    let round = bearwatch::storage::merge_journal(&location, Table::LabelFeedback, later(3)).unwrap();
    assert_eq!((round.merges >= 1, round.deleted), (true, 2), "{round:?}");
    assert!(files().iter().all(|n| n.contains("-merged-hour")), "{:?}", files());
    assert!(tail.new_rows().unwrap().is_empty(), "the tail had read both files the merge holds");
    // A second writer's round finds nothing left to do: the merge's name is taken.
    assert_eq!(bearwatch::storage::merge_journal(&location, Table::LabelFeedback, later(3)).unwrap(), Default::default());
    let both = format!("n,analysts\n{},2\n", 2 * lines);
    assert_eq!(sql(&s3, storage, "SELECT count(*) AS n, count(DISTINCT analyst) AS analysts FROM label_feedback"), both);
    assert_eq!(JournalTail::new(&location).new_rows().unwrap().len(), 2 * lines);
}

#[test]
fn two_writers_on_one_prefix_cannot_both_commit() {
    let s3 = S3Server::start("fence");
    let at = |prefix: &str| s3.location(prefix);
    let state = serde_json::json!({"offsets": {"news": {"0": 10}}});

    // Both read "no checkpoint"; the first commit wins, the second is fenced off.
    let (mut a, _) = Storage::open::<serde_json::Value>(&at("one"), None, false).unwrap();
    let (mut b, _) = Storage::open::<serde_json::Value>(&at("one"), None, false).unwrap();
    a.commit(&state).unwrap();
    let err = b.commit(&state).unwrap_err();
    assert!(matches!(err, StorageError::Fenced { .. }), "{err}");
    assert!(err.to_string().contains("two pipelines share this storage"), "{err}");
    // The winner goes on committing over its own versions.
    a.commit(&state).unwrap();

    // One that restarted and read the newest checkpoint takes over; the one before it cannot commit.
    let (mut c, restored) = Storage::open::<serde_json::Value>(&at("one"), None, false).unwrap();
    assert_eq!(restored.unwrap()["offsets"]["news"]["0"], 10);
    c.commit(&state).unwrap();
    assert!(matches!(a.commit(&state), Err(StorageError::Fenced { .. })));

    // An unreachable store is a clear error, after the client's retries, not a hang.
    let closed = S3Config { endpoint: Some(EnvString::expand(&format!("http://127.0.0.1:{}", free_port())).unwrap()), retries: 1, ..s3.settings() };
    let started = Instant::now();
    let err = Storage::open::<serde_json::Value>(&Location::parse("s3://fence/gone", &closed).unwrap(), None, false).err().unwrap();
    assert!(err.to_string().contains("s3://fence/gone/checkpoint.json"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(30), "{:?}", started.elapsed());
}

/// A big state on object storage: one pack of new pieces per commit beside a small manifest, packs
/// deleted once no checkpoint references them, and a process fenced off by a newer one reads and
/// deletes nothing of the newer one's.
#[test]
fn a_big_checkpoint_on_object_storage_writes_its_changes_and_deletes_what_no_checkpoint_uses() {
    let s3 = S3Server::start("packs");
    let packs = || s3.list("desk/checkpoint.packs");
    let size = |key: &String| s3.get(key).unwrap().len();

    let (mut a, _) = Storage::open::<serde_json::Value>(&s3.location("desk"), None, false).unwrap();
    a.commit(&big(0)).unwrap();
    let first = packs();
    assert!(first.len() == 1 && s3.get("desk/checkpoint.json").unwrap().starts_with(br#"{"packed":"#), "{first:?}");
    a.commit(&big(20)).unwrap();
    let both = packs();
    assert_eq!(both.len(), 2);
    assert!(both.iter().map(size).min().unwrap() * 20 < size(&first[0]), "the second pack holds the changes only");
    let same = |checkpoint: serde_json::Value, state: serde_json::Value| checkpoint["tracked"] == state["tracked"] && checkpoint["offsets"] == state["offsets"];
    assert!(same(s3.checkpoint("desk", None).unwrap(), big(20)));

    // A restarted process takes over: it reads the pieces from the packs and references them.
    let (mut b, restored) = Storage::open::<serde_json::Value>(&s3.location("desk"), None, false).unwrap();
    assert!(same(restored.unwrap(), big(20)));
    b.commit(&big(40)).unwrap();
    assert!(packs().contains(&first[0]));
    // The one before it is fenced off: its pack stays unreferenced, and it deletes nothing.
    let before = packs();
    assert!(matches!(a.commit(&big(60)), Err(StorageError::Fenced { .. })));
    let left: Vec<String> = packs().into_iter().filter(|key| !before.contains(key)).collect();
    assert_eq!(left.len(), 1, "the fenced commit's pack: {left:?}");
    assert!(before.iter().all(|key| packs().contains(key)));
    assert!(same(s3.checkpoint("desk", None).unwrap(), big(40)), "the newer process's checkpoint");
    // A small state again: the packs go (not the fenced one's, which no checkpoint of b's named).
    b.commit(&serde_json::json!({"offsets": {"news": {"0": 1}}})).unwrap();
    assert_eq!(packs(), left);
}

/// A state big enough to be checkpointed in pieces (30,000 stories from `first` on).
fn big(first: usize) -> serde_json::Value {
    let tracked: Vec<String> = (first..first + 30_000).map(|i| format!("story {i}: shares of company {} fell {} percent", i * 7919 % 1013, i % 97)).collect();
    serde_json::json!({ "offsets": { "news": { "0": first } }, "tracked": tracked })
}

/// A crash (or a fenced process) between a pack and its checkpoint leaves the pack behind. The
/// next process's first commit deletes it once the store's clock says it is well older than that
/// commit, and leaves one too new to tell from a pack another process is about to commit.
#[test]
fn a_pack_no_checkpoint_references_is_swept_once_it_is_older_than_the_checkpoint() {
    let s3 = S3Server::start("sweep");
    let packs = || s3.list("desk/checkpoint.packs");
    let (mut a, _) = Storage::open::<serde_json::Value>(&s3.location("desk"), None, false).unwrap();
    a.commit(&big(0)).unwrap();
    drop(a);
    let (left, fresh) = ("desk/checkpoint.packs/1-dead-2.pack", "desk/checkpoint.packs/2-new-1.pack");
    s3.put(left, b"a crash's pack");
    // The sweep takes packs written 10 s or more before the checkpoint, by the store's clock.
    std::thread::sleep(Duration::from_secs(11));
    s3.put(fresh, b"a pack about to be committed");
    let (mut b, _) = Storage::open::<serde_json::Value>(&s3.location("desk"), None, false).unwrap();
    b.commit(&big(20)).unwrap();
    let after = packs();
    assert!(!after.contains(&left.to_string()), "{after:?}");
    assert!(after.contains(&fresh.to_string()), "{after:?}");
    assert_eq!(s3.checkpoint("desk", None).unwrap()["tracked"], big(20)["tracked"], "every piece the checkpoint names is there");
}

/// Two `aggregate` instances (and one `classify`) on one bucket, each with its own `[storage]
/// instance`: SQL over the bucket (the CLI, and the HTTP API of either instance) sees both
/// instances' rows, every story once, each topic's windows from the one instance that owns it.
#[test]
fn two_aggregate_instances_share_a_bucket_and_one_sql_reads_both() {
    let s3 = S3Server::start("market");
    let dir = tempfile::tempdir().unwrap();
    let brokers = common::brokers();
    let topic = common::unique("instances");
    let scored = format!("{topic}.scored");
    common::create_topic_on(brokers, &topic, 2);
    common::create_topic_on(brokers, &scored, 4);
    let group = common::unique("group");
    let remote = "s3://market/desk";
    let pipeline = |instance: &str, extra: &str| {
        format!(
            "[source]\ntype = \"kafka\"\nbrokers = \"{brokers}\"\ntopics = [\"{topic}\"]\ngroup_id = \"{group}\"\n\
             [source.properties]\n\"session.timeout.ms\" = \"6000\"\n[sink]\ntopic = \"{scored}\"\n\
             [window]\nsize = \"1d\"\nallowed_lateness = \"30d\"\n\
             [storage]\npath = \"{remote}\"\ninstance = \"{instance}\"\nlocal_path = \"local-{instance}\"\ncheckpoint_interval = \"300ms\"\n{}\
             [run]\nsummary_interval = \"0s\"\n{extra}",
            s3.storage_settings()
        )
    };
    let http = free_port();
    let mut a = Pipeline::start_with(dir.path(), "a", &pipeline("a", &format!("[server]\nhttp = \"127.0.0.1:{http}\"\n")), &["--role", "aggregate"]);
    let mut b = Pipeline::start_with(dir.path(), "b", &pipeline("b", ""), &["--role", "aggregate"]);
    let mut classify = Pipeline::start_with(dir.path(), "classify", &pipeline("classify", ""), &["--role", "classify"]);
    common::wait_for_partitions(&[&a, &b, &classify], Duration::from_secs(90));
    let total = 1500u64;
    let file = dir.path().join("in.jsonl");
    std::fs::write(&file, stories(total as usize)).unwrap();
    common::produce_to(brokers, &topic, &file);
    let scored_by = |name: &str| scored_by(&s3, name);
    let deadline = Instant::now() + Duration::from_secs(240);
    while scored_by("a") + scored_by("b") < total {
        assert!(Instant::now() < deadline, "the instances did not window every story\n{}\n{}", a.logs(), b.logs());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(scored_by("a") > 0 && scored_by("b") > 0, "one instance got every story; nothing was shared");

    // Instance a's HTTP API answers over both instances' tables.
    let api = Api::new(&format!("http://127.0.0.1:{http}"));
    let rows = api.sql(None, "SELECT instance, count(*) AS n FROM news GROUP BY instance ORDER BY instance");
    let counted: Vec<(String, u64)> = rows.iter().map(|r| (r["instance"].as_str().unwrap().to_string(), r["n"].as_u64().unwrap())).collect();
    assert_eq!(counted.iter().map(|(i, _)| i.as_str()).collect::<Vec<_>>(), ["a", "b"], "{rows:?}");
    assert_eq!(counted.iter().map(|(_, n)| n).sum::<u64>(), total, "{rows:?}");
    for p in [&mut classify, &mut a, &mut b] {
        p.signal("TERM");
        assert!(p.wait(Duration::from_secs(60)).success(), "{}", p.logs());
    }

    // The CLI over the bucket: every story once, named by no instance.
    assert_eq!(sql(&s3, remote, "SELECT count(*) AS n, count(DISTINCT id) AS ids FROM news"), format!("n,ids\n{total},{total}\n"));
    assert_eq!(sql(&s3, remote, "SELECT count(DISTINCT instance) AS instances FROM windows"), "instances\n2\n");
    // A topic's stories all went to one instance (the scored topic is keyed by topic) ...
    assert_eq!(sql(&s3, remote, "SELECT count(*) AS split FROM (SELECT topic FROM news GROUP BY topic HAVING count(DISTINCT instance) > 1)"), "split\n0\n");
    // ... whose windows count each of them once; each instance's `all` counts its own topics.
    let per_topic = sql(&s3, remote, "SELECT topic, count(*) AS n FROM news GROUP BY topic ORDER BY topic");
    let windowed = sql(
        &s3,
        remote,
        "SELECT topic, CAST(sum(n) AS BIGINT) AS n FROM (SELECT topic, window_start, max(n + copies) AS n FROM windows WHERE topic <> 'all' \
         GROUP BY topic, window_start) GROUP BY topic ORDER BY topic",
    );
    assert_eq!(windowed, per_topic);
    let market = "SELECT CAST(sum(m) AS BIGINT) AS n FROM (SELECT max(n + copies) AS m FROM windows WHERE topic = 'all' GROUP BY instance, window_start)";
    assert_eq!(sql(&s3, remote, market), format!("n\n{total}\n"));
    // docs/SQL.md's market query over instances: per window, the instances' `all` rows summed.
    let doc = std::fs::read_to_string(format!("{ROOT}/docs/SQL.md")).unwrap();
    let documented = doc.split("```sql instances\n").nth(1).and_then(|b| b.split("```").next()).expect("docs/SQL.md shows the market query");
    let first_two = |csv: String| csv.lines().skip(1).map(|l| l.split(',').take(2).collect::<Vec<_>>().join(",")).collect::<Vec<_>>();
    let summed = first_two(sql(&s3, remote, documented));
    // The same counts from the topics' windows: every story has one topic, in one instance.
    let topics = "SELECT window_start, CAST(sum(n) AS BIGINT) AS stories FROM (SELECT topic, window_start, max(n) AS n FROM windows \
                  WHERE topic <> 'all' AND ticker IS NULL GROUP BY topic, window_start) GROUP BY window_start ORDER BY window_start";
    assert!(!summed.is_empty());
    assert_eq!(summed, first_two(sql(&s3, remote, topics)));
}

/// Two `aggregate` instances on one bucket; one is killed with -9 mid-stream. The other takes its
/// partitions over from its checkpoint (windows, alert state, offsets) once Kafka hands them over,
/// and the union of both instances' tables equals one instance's run over the same scored stories:
/// every story once in `news`, every topic's windows, the market's `all` windows summed over the
/// instances, and the alerts.
#[test]
fn an_aggregate_instance_killed_mid_stream_is_taken_over_and_the_union_equals_one_instance() {
    let s3 = S3Server::start("takeover");
    let dir = tempfile::tempdir().unwrap();
    let brokers = common::brokers();
    let topic = common::unique("takeover");
    let scored = format!("{topic}.scored");
    // One partition in: the scored topic gets each topic's stories in event-time order; and no
    // partition counts as read to its end (no statistics), so the watermark is the slowest
    // partition's and neither run has a late story: the windows close alike.
    common::create_topic_on(brokers, &topic, 1);
    common::create_topic_on(brokers, &scored, 4);
    // Topic rules that read only the topic's own windows (the market prior reads `all`, which each
    // instance counts for its own stories), and no grace period, which reads the watermark's
    // position between stories.
    let shipped = std::fs::read_to_string(format!("{ROOT}/alerts/default.toml")).unwrap();
    let rules = shipped.replacen("p_value = 0.001 ", "p_value = 0.01 ", 1).replacen("prior_stories = 50", "prior_stories = 0", 1).replacen("keep_firing_for = \"1h\"", "", 1);
    assert!(!rules.contains("prior_stories = 50") && !rules.contains("keep_firing_for"), "alerts/default.toml changed");
    std::fs::write(dir.path().join("rules.toml"), rules).unwrap();
    let group = common::unique("group");
    let remote = "s3://takeover/desk";
    // Live rows are read at steps of event time with however many stories each run read ahead
    // of the watermark (which differs between any two runs over several partitions): alerts here
    // come from final rows only.
    let pipeline = |group: &str, storage: &str| {
        format!(
            "[source]\ntype = \"kafka\"\nbrokers = \"{brokers}\"\ntopics = [\"{topic}\"]\ngroup_id = \"{group}\"\n\
             [source.properties]\n\"session.timeout.ms\" = \"6000\"\n\"statistics.interval.ms\" = \"0\"\n[sink]\ntopic = \"{scored}\"\n\
             [window]\nsize = \"4h\"\nslide = \"1h\"\nallowed_lateness = \"1h\"\n{storage}\
             [run]\nsummary_interval = \"0s\"\n[alerts]\nrules = [\"rules.toml\"]\nevaluate_every = \"3650d\"\n\
             [[receivers]]\nname = \"log\"\ntype = \"log\"\n"
        )
    };
    let instance = |name: &str| {
        let storage = format!(
            "[storage]\npath = \"{remote}\"\ninstance = \"{name}\"\nlocal_path = \"local-{name}\"\ncheckpoint_interval = \"300ms\"\n{}",
            s3.storage_settings()
        );
        pipeline(&group, &storage)
    };
    let mut a = Pipeline::start_with(dir.path(), "a", &instance("a"), &["--role", "aggregate"]);
    let mut b = Pipeline::start_with(dir.path(), "b", &instance("b"), &["--role", "aggregate"]);
    // The reference: one instance alone, in its own group, reading the same scored stories.
    let alone = pipeline(&common::unique("alone"), "[storage]\npath = \"alone\"\ncheckpoint_interval = \"300ms\"\n");
    let mut whole = Pipeline::start_with(dir.path(), "whole", &alone, &["--role", "aggregate"]);
    let mut classify = Pipeline::start_with(dir.path(), "classify", &instance("classify"), &["--role", "classify"]);
    common::wait_for_partitions(&[&a, &b, &whole, &classify], Duration::from_secs(90));
    let total = 3000u64;
    let file = dir.path().join("in.jsonl");
    std::fs::write(&file, stories(total as usize)).unwrap();
    common::produce_to(brokers, &topic, &file);

    let scored_by = |name: &str| scored_by(&s3, name);
    let deadline = Instant::now() + Duration::from_secs(300);
    while scored_by("a") < 300 {
        assert!(Instant::now() < deadline, "instance a made no progress\n{}", a.logs());
        std::thread::sleep(Duration::from_millis(20));
    }
    a.signal("KILL");
    a.wait(Duration::from_secs(10));
    let at_kill = scored_by("a");
    while scored_by("a") + scored_by("b") < total || common::checkpoint(&whole.storage).is_none_or(|c| common::counter(&c, "scored") < total) {
        assert!(Instant::now() < deadline, "the stories were not all counted (a {at_kill}, b {})\n{}\n{}", scored_by("b"), b.logs(), whole.logs());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(at_kill < total / 2, "a was killed after its share ({at_kill}); nothing was taken over");
    for p in [&mut classify, &mut b, &mut whole] {
        p.signal("TERM");
        assert!(p.wait(Duration::from_secs(60)).success(), "{}", p.logs());
    }
    let logs = b.logs();
    assert!(logs.contains("took over a partition from another instance's checkpoint"), "{logs}");

    let alone = dir.path().join("alone");
    let alone = alone.to_str().unwrap();
    // Every story once across the union.
    assert_eq!(sql(&s3, remote, "SELECT count(*) AS n, count(DISTINCT id) AS ids FROM news"), format!("n,ids\n{total},{total}\n"));
    let late = "SELECT count(*) AS n FROM news WHERE id IN (SELECT id FROM late)";
    assert_eq!((sql(&s3, remote, late), sql(&s3, alone, late)), ("n\n0\n".into(), "n\n0\n".into()), "no story missed its windows");
    // Each topic's windows: the newest row of each window (the instance that went on with it
    // wrote it last) equals the reference's.
    let topics = "SELECT window_start, topic, n, n_negative, n_neutral, n_positive, copies, mean_sentiment FROM \
                  (SELECT *, row_number() OVER (PARTITION BY window_start, topic ORDER BY updated_at DESC, n DESC) AS rn FROM windows \
                   WHERE topic <> 'all' AND ticker IS NULL) WHERE rn = 1 ORDER BY window_start, topic";
    let (union, reference) = (sql(&s3, remote, topics), sql(&s3, alone, topics));
    assert!(reference.lines().count() > 100, "{reference}");
    let same = |a: &str, b: &str| {
        let (a, b): (Vec<&str>, Vec<&str>) = (a.split(',').collect(), b.split(',').collect());
        let mean = |row: &[&str]| row.last().and_then(|m| m.parse::<f64>().ok());
        a[..a.len() - 1] == b[..b.len() - 1] && (a == b || matches!((mean(&a), mean(&b)), (Some(x), Some(y)) if (x - y).abs() < 1e-9))
    };
    let differ: Vec<(&str, &str)> = union.lines().zip(reference.lines()).filter(|(u, r)| !same(u, r)).take(5).collect();
    assert!(
        differ.is_empty() && union.lines().count() == reference.lines().count(),
        "topic windows differ from one instance's ({} rows against {}): {differ:?}",
        union.lines().count(),
        reference.lines().count()
    );
    // The market: per window, each instance's `all` (its own stories) summed. Every story is there
    // once, counted or as a copy (a story lost or counted twice changes that); which copies fold
    // differs, since they fold within an instance: a near-duplicate whose copies went to both
    // instances (topics each owns, or one before the kill and one after) counts once in each.
    let market = "SELECT window_start, CAST(sum(n) AS BIGINT) AS n, CAST(sum(seen) AS BIGINT) AS seen FROM \
                  (SELECT window_start, max(n) AS n, max(n + copies) AS seen FROM windows WHERE topic = 'all' AND ticker IS NULL \
                   GROUP BY {by}window_start) GROUP BY window_start ORDER BY window_start";
    let (union, reference) = (sql(&s3, remote, &market.replace("{by}", "instance, ")), sql(&s3, alone, &market.replace("{by}", "")));
    let rows = |csv: &str| -> Vec<(String, u64, u64)> {
        csv.lines().skip(1).map(|l| l.split(',').collect::<Vec<_>>()).map(|c| (c[0].to_string(), c[1].parse().unwrap(), c[2].parse().unwrap())).collect()
    };
    let (union, reference) = (rows(&union), rows(&reference));
    assert_eq!(union.len(), reference.len(), "market windows");
    for (u, r) in union.iter().zip(&reference) {
        assert!(u.0 == r.0 && u.2 == r.2 && u.1 <= u.2, "market window {u:?} against one instance's {r:?}");
    }
    // The alerts: the same changes of the same windows with the same numbers. (When each was
    // raised, in event time, is the watermark at that moment, which depends on interleaving.)
    let alerts = "SELECT rule, state, topic, window_start, round(value, 9) AS value, round(baseline, 9) AS baseline, count FROM alerts \
                  ORDER BY window_start, topic, rule, state";
    let (union, reference) = (sql(&s3, remote, alerts), sql(&s3, alone, alerts));
    assert!(reference.lines().count() > 1, "the reference raised no alert; nothing was compared");
    assert_eq!(union, reference, "alerts");
    // Both instances' rows are there: a's up to its last checkpoint, named (settled by b if the
    // kill came between a checkpoint and its renames).
    assert_eq!(sql(&s3, remote, "SELECT count(DISTINCT instance) AS instances FROM news"), "instances\n2\n");
}

/// One of two aggregate instances is cut off from the store (the other still reaches it) for longer
/// than `max.poll.interval.ms`: its checkpoint waits, it stops polling, and the group gives its
/// partition to the other instance, which takes it over from the last checkpoint and counts what
/// came after. When the store answers again, the cut-off instance must not commit what it counted
/// meanwhile (the other counted it too): it stops, saying why, and started again it goes on from
/// its last checkpoint. Every story is then in the tables once.
#[test]
fn an_instance_cut_off_from_the_store_past_the_poll_interval_commits_nothing_its_taker_counts() {
    let s3 = S3Server::start("cutoff");
    let dir = tempfile::tempdir().unwrap();
    let brokers = common::brokers();
    let topic = common::unique("cutoff");
    let scored = format!("{topic}.scored");
    common::create_topic_on(brokers, &topic, 1);
    common::create_topic_on(brokers, &scored, 1);
    let group = common::unique("group");
    let target = s3.endpoint.trim_start_matches("http://").to_string();
    let relays = [Relay::start(&target), Relay::start(&target)];
    let http = [free_port(), free_port()];
    let names = ["a", "b"];
    let instance = |i: usize| {
        format!(
            "[source]\ntype = \"kafka\"\nbrokers = \"{brokers}\"\ntopics = [\"{topic}\"]\ngroup_id = \"{group}\"\n\
             [source.properties]\n\"session.timeout.ms\" = \"6000\"\n\"max.poll.interval.ms\" = \"10000\"\n[sink]\ntopic = \"{scored}\"\n\
             [window]\nsize = \"4h\"\nslide = \"1h\"\nallowed_lateness = \"1h\"\n\
             [storage]\npath = \"s3://cutoff/desk\"\ninstance = \"{name}\"\nlocal_path = \"local-{name}\"\ncheckpoint_interval = \"1s\"\n\
             [storage.s3]\nendpoint = \"http://127.0.0.1:{port}\"\naccess_key_id = \"test\"\nsecret_access_key = \"test\"\ntimeout = \"1s\"\nretries = 1\n\
             [run]\nsummary_interval = \"0s\"\n[server]\nhttp = \"127.0.0.1:{http}\"\n",
            name = names[i],
            port = relays[i].port,
            http = http[i],
        )
    };
    let mut members = [
        Pipeline::start_with(dir.path(), "a", &instance(0), &["--role", "aggregate"]),
        Pipeline::start_with(dir.path(), "b", &instance(1), &["--role", "aggregate"]),
    ];
    // The one partition is one member's once both have joined (its last assignment names it).
    let owns = |p: &Pipeline| {
        let logs = std::fs::read_to_string(&p.stderr).unwrap_or_default();
        logs.lines().filter(|l| l.contains("partitions assigned")).last().map(|l| l.contains("partitions=[("))
    };
    let deadline = Instant::now() + Duration::from_secs(300);
    while members.iter().map(owns).collect::<Vec<_>>() != [Some(true), Some(false)] && members.iter().map(owns).collect::<Vec<_>>() != [Some(false), Some(true)] {
        assert!(Instant::now() < deadline, "the group did not settle\n{}\n{}", members[0].logs(), members[1].logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    let (cut, taker) = if owns(&members[0]) == Some(true) { (0, 1) } else { (1, 0) };
    let story = |i: usize| {
        serde_json::json!({"id": format!("s{i}"), "published_at": format!("2024-03-01T{:02}:{:02}:00Z", i / 60, i % 60),
            "headline": format!("Shares fall on news {i}"), "topic": "earnings", "topic_score": 0.9, "sentiment": "negative",
            "p_negative": 0.8, "p_neutral": 0.1, "p_positive": 0.1, "sentiment_score": -0.7, "model": "m@1"})
        .to_string()
    };
    let produce = |from: usize, to: usize| {
        let file = dir.path().join(format!("scored-{from}.jsonl"));
        std::fs::write(&file, (from..to).map(story).collect::<Vec<_>>().join("\n") + "\n").unwrap();
        common::produce_to(brokers, &scored, &file);
    };
    let metric = |i: usize, name: &str| common::metric(http[i], name);
    let scored_by = |i: usize| scored_by(&s3, names[i]);

    // 200 stories counted and committed by the owner, which then goes idle (its checkpoints find
    // nothing new and write nothing) when its way to the store is cut; 200 more are read, and its
    // next checkpoint waits for the store.
    produce(0, 200);
    while scored_by(cut) < 200 || metric(cut, "bearwatch_checkpoints_unchanged_total") == 0 {
        assert!(Instant::now() < deadline, "the first stories were not committed\n{}", members[cut].logs());
        std::thread::sleep(Duration::from_millis(20));
    }
    relays[cut].cut();
    produce(200, 400);
    while metric(cut, "bearwatch_stage_received_total{stage=\"source\"}") < 400 {
        assert!(Instant::now() < deadline, "the owner did not read the next stories\n{}", members[cut].logs());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(scored_by(cut), 200);
    let logged = |p: &Pipeline, what: &str| std::fs::read_to_string(&p.stderr).unwrap_or_default().contains(what);
    // It waits for the store, the group moves the partition, and the other instance takes it
    // over from the owner's last checkpoint and counts the 200 after it.
    while !(logged(&members[cut], "storage unavailable") && logged(&members[taker], "took over a partition from another instance's checkpoint") && scored_by(taker) >= 200) {
        if Instant::now() > deadline {
            relays[cut].mend();
            panic!("no takeover\n{}\n{}", members[cut].logs(), members[taker].logs());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    relays[cut].mend();
    // The store answers again: the cut-off instance stops instead of committing stories 200–399.
    while members[cut].child.try_wait().unwrap().is_none() {
        assert!(scored_by(cut) == 200, "the cut-off instance committed what its taker counted\n{}", members[cut].logs());
        assert!(Instant::now() < deadline, "the cut-off instance neither stopped nor committed\n{}", members[cut].logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = members[cut].wait(Duration::from_secs(1));
    let logs = members[cut].logs();
    assert!(!status.success() && logs.contains("max.poll.interval.ms") && logs.contains("nothing more is committed here"), "{logs}");
    assert_eq!(scored_by(cut), 200);
    // Started again, it goes on from its last checkpoint (its uncommitted parts deleted), and a
    // few more stories reach whichever instance owns the partition now.
    // (With request timeouts whose three make more than half the poll interval, it says so.)
    let slower = instance(cut).replace("timeout = \"1s\"", "timeout = \"2s\"");
    let mut again = Pipeline::start_with(dir.path(), &format!("{}-again", names[cut]), &slower, &["--role", "aggregate"]);
    while !logged(&again, "partitions assigned") {
        assert!(again.child.try_wait().unwrap().is_none() && Instant::now() < deadline, "the restart did not join\n{}", again.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    produce(400, 450);
    while scored_by(cut) + scored_by(taker) < 450 {
        assert!(Instant::now() < deadline, "the last stories were not counted\n{}\n{}", again.logs(), members[taker].logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    for p in [&mut again, &mut members[taker]] {
        p.signal("TERM");
        assert!(p.wait(Duration::from_secs(60)).success(), "{}", p.logs());
    }
    assert_eq!(sql(&s3, "s3://cutoff/desk", "SELECT count(*) AS n, count(DISTINCT id) AS ids FROM news"), "n,ids\n450,450\n");
    assert!(logged(&again, "storage.s3.timeout is long for max.poll.interval.ms") && !logged(&members[taker], "storage.s3.timeout is long"));
}

/// The S3 server stops answering mid-stream: the checkpoint waits (logged, and the gauge says so),
/// reading waits with it, and once the server answers again every story arrives, once.
#[test]
fn an_unreachable_store_makes_the_pipeline_wait_and_lose_nothing() {
    let total = 1500;
    let s3 = S3Server::start("outage");
    let dir = tempfile::tempdir().unwrap();
    let news = dir.path().join("news.jsonl");
    std::fs::write(&news, stories(total)).unwrap();
    let http = free_port();
    let settings = format!(
        "local_path = \"local\"\n{}timeout = \"1s\"\nretries = 1\n[server]\nhttp = \"127.0.0.1:{http}\"\n",
        s3.storage_settings()
    );
    let mut run = Pipeline::start(dir.path(), "p", &config(news.to_str().unwrap(), "s3://outage/desk", &settings));
    let scored = |c: &serde_json::Value| c["counters"]["scored"].as_u64().unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(300);
    while !s3.checkpoint("desk", None).is_some_and(|c| scored(&c) > 0) {
        assert!(run.child.try_wait().unwrap().is_none() && Instant::now() < deadline, "no first checkpoint\n{}", run.logs());
        std::thread::sleep(Duration::from_millis(20));
    }
    s3.pause();
    let metrics = || ureq::get(format!("http://127.0.0.1:{http}/metrics")).call().ok().and_then(|mut r| r.body_mut().read_to_string().ok()).unwrap_or_default();
    while !(std::fs::read_to_string(&run.stderr).unwrap_or_default().contains("storage unavailable") && metrics().contains("bearwatch_storage_unavailable 1")) {
        if run.child.try_wait().unwrap().is_some() || Instant::now() > deadline {
            s3.resume();
            panic!("the pipeline did not wait for the store\n{}", run.logs());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    s3.resume();
    assert!(run.wait(Duration::from_secs(300)).success(), "{}", run.logs());
    assert_eq!(sql(&s3, "s3://outage/desk", "SELECT count(*) AS n, count(DISTINCT id) AS ids FROM news"), format!("n,ids\n{total},{total}\n"));
}
