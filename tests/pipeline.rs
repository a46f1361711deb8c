//! `bearwatch run` on the file source: the demo, dead letters, late events, duplicates, crash
//! recovery and clean shutdown. The real binary, model and ONNX Runtime; tables read back with
//! DataFusion.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{DEMO_DATA, LATEST_WINDOWS, Pipeline, assert_same_rows, checkpoint, counter, query, query_one, stories};

#[test]
fn the_demo_runs_with_no_arguments_and_leaves_tables_datafusion_reads() {
    let dir = tempfile::tempdir().unwrap();
    // From an unrelated directory: the embedded demo finds its bundled data and model by itself.
    let out = Command::new(env!("CARGO_BIN_EXE_bearwatch")).arg("run").current_dir(dir.path()).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("done: 3000 stories read, 3000 scored, 0 dead-lettered"), "{stdout}");
    assert!(stdout.lines().filter(|l| l.contains(" scored ") && l.contains("/s")).count() >= 2, "a live summary: {stdout}");

    let storage = dir.path().join("data/demo");
    assert_eq!(query_one(&storage, "SELECT count(*) FROM news"), "3000");
    assert_eq!(query_one(&storage, "SELECT count(DISTINCT id) FROM news"), "3000");
    assert_eq!(query_one(&storage, "SELECT min(published_at) FROM news"), "1987-02-26T15:01:01Z");
    // 4-hour windows every hour: each story is in four windows of its topic and four of `all`, as a
    // story or as a copy of one (the wire sent some stories twice).
    assert_eq!(query_one(&storage, "SELECT sum(n) + sum(copies) FROM windows WHERE final AND topic = 'all'"), "12000");
    assert_eq!(query_one(&storage, "SELECT sum(n) + sum(copies) FROM windows WHERE final AND topic <> 'all'"), "12000");
    assert_ne!(query_one(&storage, "SELECT sum(copies) FROM windows WHERE final AND topic = 'all'"), "0", "the demo's re-sent stories are folded");
    assert_eq!(
        query_one(&storage, "SELECT count(*) FROM (SELECT window_start, topic FROM windows WHERE final GROUP BY 1, 2 HAVING count(*) > 1)"),
        "0",
        "one final row per window"
    );
    let by_topic = query(
        &storage,
        "SELECT n.topic, count(*) FROM news n GROUP BY n.topic \
         EXCEPT SELECT topic, (sum(n) + sum(copies)) / 4 FROM windows WHERE final AND topic <> 'all' GROUP BY topic",
    );
    assert!(by_topic.is_empty(), "windows disagree with news: {by_topic:?}");
    assert_eq!(
        query_one(&storage, "SELECT count(*) FROM windows WHERE final AND (n <> n_negative + n_neutral + n_positive OR abs(neg_share - CAST(n_negative AS DOUBLE) / n) > 1e-12)"),
        "0"
    );

    // The default rules fire on the replay, with reasons and the headlines behind them.
    assert!(stdout.contains("[FIRING] "), "{stdout}");
    assert!(stdout.contains("p_negative "), "an alert lists its most negative headlines: {stdout}");
    let firing: u64 = query_one(&storage, "SELECT count(*) FROM alerts WHERE state = 'firing'").parse().unwrap();
    assert!(firing >= 1);
    assert_eq!(
        query_one(&storage, "SELECT count(*) FROM alerts WHERE summary = '' OR top_headlines NOT LIKE '[{\"id\":%' OR count < 1"),
        "0"
    );

    // A second run replays from scratch (the demo sets reset_on_start) rather than finding nothing to do.
    let again = Command::new(env!("CARGO_BIN_EXE_bearwatch")).arg("run").current_dir(dir.path()).output().unwrap();
    assert!(String::from_utf8_lossy(&again.stdout).contains("3000 scored"));
    assert_eq!(query_one(&storage, "SELECT count(*) FROM news"), "3000");
}

fn file_pipeline(input: &str, storage: &str, extra: &str) -> String {
    format!(
        r#"
[source]
type = "file"
path = "{input}"
{extra}

[window]
size = "1h"
allowed_lateness = "0s"

[storage]
path = "{storage}"
checkpoint_interval = "200ms"

[run]
summary_interval = "0s"
"#
    )
}

#[test]
fn bad_lines_go_to_the_dead_letter_file_with_reasons_and_the_rest_replays_in_event_time_order() {
    let dir = tempfile::tempdir().unwrap();
    let story = |id: &str, at: &str, headline: &str| format!(r#"{{"id":"{id}","published_at":"{at}","headline":"{headline}"}}"#);
    let mut input = Vec::new();
    for line in [
        story("a", "2024-03-01T10:00:00Z", "Oil prices fall sharply"),
        // A field outside the schema, with a number beyond 64 bits: kept in `extra` as written.
        r#"{"id":"b","published_at":"2024-03-01T12:30:00Z","headline":"Bank raises dividend","seq": 123456789012345678901234567890}"#.to_string(),
        // Out of order in the file, but replayed in event-time order, so not late.
        story("c", "2024-03-01T10:30:00Z", "Copper slumps"),
        // Same id as "a": a replayed duplicate, dropped.
        story("a", "2024-03-01T12:31:00Z", "Oil prices fall sharply"),
        "{not json".to_string(),
        r#"{"id":"m","published_at":"2024-03-01T12:00:00Z"}"#.to_string(),
        r#"{"id":7,"published_at":"2024-03-01T12:00:00Z","headline":"x"}"#.to_string(),
        story("future", "2999-01-01T00:00:00Z", "From the future"),
        story("past", "1900-01-01T00:00:00Z", "From the past"),
        story("big", "2024-03-01T12:40:00Z", &"x".repeat(300 * 1024)),
    ] {
        input.extend_from_slice(line.as_bytes());
        input.push(b'\n');
    }
    input.extend_from_slice(b"{\"id\":\"u\",\"published_at\":\"2024-03-01T12:00:00Z\",\"headline\":\"\xff\xfe\"}\n");
    std::fs::write(dir.path().join("in.jsonl"), input).unwrap();

    let config = file_pipeline("in.jsonl", "store", "");
    let mut pipeline = Pipeline::start(dir.path(), "p", &config);
    let status = pipeline.wait(Duration::from_secs(60));
    assert!(status.success(), "{}", pipeline.logs());
    let stdout = std::fs::read_to_string(&pipeline.stdout).unwrap();
    assert!(stdout.contains("11 stories read, 3 scored, 7 dead-lettered, 0 late, 1 duplicates, 0 alert state changes"), "{stdout}");
    // The closing summary names the tables that hold parts, and only those.
    assert!(stdout.contains("tables (Parquet) and checkpoint in store: news/, windows/\n"), "{stdout}");

    let dead: Vec<serde_json::Value> = std::fs::read_to_string(dir.path().join("store/dead-letter.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut kinds: Vec<&str> = dead.iter().map(|d| d["error.kind"].as_str().unwrap()).collect();
    kinds.sort();
    assert_eq!(
        kinds,
        ["invalid_utf8", "json", "missing_field", "timestamp_out_of_range", "timestamp_out_of_range", "too_large", "wrong_type"]
    );
    let missing = dead.iter().find(|d| d["error.kind"] == "missing_field").unwrap();
    assert_eq!(missing["error.message"], "missing required field `headline`");
    assert_eq!(missing["payload"], r#"{"id":"m","published_at":"2024-03-01T12:00:00Z"}"#, "the original bytes are kept");
    assert!(dead.iter().any(|d| d["payload_hex"].as_str().is_some_and(|h| h.contains("fffe"))));

    let storage = &pipeline.storage;
    assert_eq!(query(storage, "SELECT id FROM news ORDER BY id"), vec![vec!["a"], vec!["b"], vec!["c"]]);
    assert_eq!(query_one(storage, "SELECT sum(n) FROM windows WHERE final AND topic = 'all'"), "3");
    assert_eq!(query_one(storage, "SELECT extra FROM news WHERE id = 'b'"), r#"{"seq":123456789012345678901234567890}"#);
}

#[test]
fn a_kill_9_mid_replay_and_a_restart_give_the_same_tables_as_an_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in.jsonl"), stories(1200)).unwrap();
    // 1,200 stories cover about four days of 1987: at 200,000× that is ~2 s, long enough to kill it.
    let paced = r#"speed = 200000"#;

    let mut whole = Pipeline::start(dir.path(), "whole", &file_pipeline("in.jsonl", "whole", ""));
    assert!(whole.wait(Duration::from_secs(120)).success(), "{}", whole.logs());

    let config = file_pipeline("in.jsonl", "crashed", paced);
    let mut first = Pipeline::start(dir.path(), "first", &config);
    first.wait_for_checkpoint(Duration::from_secs(60), "a checkpoint with 200 stories", |c| counter(c, "scored") >= 200);
    std::thread::sleep(Duration::from_millis(150));
    first.signal("KILL");
    first.wait(Duration::from_secs(10));
    let at_kill = counter(&checkpoint(&first.storage).unwrap(), "scored");
    assert!(at_kill < 1200, "the kill came after the end ({at_kill}); nothing was tested");

    let mut second = Pipeline::start(dir.path(), "second", &config);
    assert!(second.wait(Duration::from_secs(120)).success(), "{}", second.logs());
    assert!(std::fs::read_to_string(&second.stderr).unwrap().contains("resuming from checkpoint"));

    let crashed = &second.storage;
    assert_eq!(query_one(crashed, "SELECT count(*) FROM news"), "1200");
    assert_eq!(query_one(crashed, "SELECT count(DISTINCT id) FROM news"), "1200");
    let final_rows = "SELECT window_start, topic, n, n_negative, n_neutral, n_positive, mean_sentiment FROM windows WHERE final ORDER BY 1, 2";
    let expected = query(&whole.storage, final_rows);
    assert!(expected.len() > 20);
    assert_same_rows(&query(crashed, final_rows), &expected, "final windows");
    assert_same_rows(&query(crashed, LATEST_WINDOWS), &query(&whole.storage, LATEST_WINDOWS), "latest windows");
}

#[test]
fn sigterm_stops_cleanly_with_everything_checkpointed_and_a_restart_finishes_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in.jsonl"), stories(1000)).unwrap();
    let config = file_pipeline("in.jsonl", "store", "speed = 100000");
    let mut first = Pipeline::start(dir.path(), "first", &config);
    first.wait_for_checkpoint(Duration::from_secs(60), "100 stories", |c| counter(c, "scored") >= 100);
    first.signal("TERM");
    let status = first.wait(Duration::from_secs(30));
    assert!(status.success(), "{status}\n{}", first.logs());
    let stdout = std::fs::read_to_string(&first.stdout).unwrap();
    assert!(stdout.starts_with("stopped: "), "{stdout}");

    // Everything read before the stop is in the tables and the checkpoint: nothing left in flight.
    let saved = checkpoint(&first.storage).unwrap();
    let read = counter(&saved, "received");
    assert_eq!(counter(&saved, "scored"), read);
    let position = saved["offsets"].as_object().unwrap().values().next().unwrap()["0"].as_i64().unwrap();
    assert_eq!(position as u64, read);
    assert_eq!(query_one(&first.storage, "SELECT count(*) FROM news"), read.to_string());
    assert!(read < 1000, "stopped after the end; nothing was tested");

    let mut second = Pipeline::start(dir.path(), "second", &config.replace("speed = 100000", ""));
    assert!(second.wait(Duration::from_secs(60)).success(), "{}", second.logs());
    assert_eq!(query_one(&second.storage, "SELECT count(DISTINCT id) FROM news"), "1000");
    assert_eq!(query_one(&second.storage, "SELECT count(*) FROM news"), "1000");
    assert_eq!(query_one(&second.storage, "SELECT sum(n) + sum(copies) FROM windows WHERE final AND topic = 'all'"), "1000");
}

/// Its stdout's reader gone (`bearwatch run | head -1`): the run goes on to its end, and what it
/// would have printed is dropped, where `println!` panicked and ended the run.
#[test]
fn a_closed_stdout_does_not_stop_the_run() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in.jsonl"), stories(500)).unwrap();
    let config = file_pipeline("in.jsonl", "store", "").replace("summary_interval = \"0s\"", "summary_interval = \"1s\"");
    std::fs::write(dir.path().join("p.toml"), config).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_bearwatch"))
        .args(["run", "--pipeline", "p.toml"])
        .current_dir(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The reader goes away before the first line.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !stderr.contains("panicked"), "{}\n{stderr}", out.status);
    assert_eq!(query_one(&dir.path().join("store"), "SELECT count(*) FROM news"), "500");
}

#[test]
fn config_errors_name_file_line_and_field_and_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, file_pipeline(DEMO_DATA, "store", "").replace("size = \"1h\"", "size = \"an hour\"")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_bearwatch")).args(["run", "--pipeline"]).arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("{}:8:8:", file.display())) && stderr.contains("`window.size`"), "{stderr}");

    std::fs::write(&file, file_pipeline(DEMO_DATA, "store", "brokers = \"${BEARWATCH_NOT_SET}\"")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_bearwatch")).args(["run", "--pipeline"]).arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("`BEARWATCH_NOT_SET` is not set"));

    // Restarting on a checkpoint under other window settings is refused rather than mixed.
    std::fs::write(dir.path().join("in.jsonl"), stories(5)).unwrap();
    let config = file_pipeline("in.jsonl", "store", "");
    let mut first = Pipeline::start(dir.path(), "first", &config);
    assert!(first.wait(Duration::from_secs(60)).success(), "{}", first.logs());
    let mut second = Pipeline::start(dir.path(), "second", &config.replace("size = \"1h\"", "size = \"2h\""));
    assert_eq!(second.wait(Duration::from_secs(60)).code(), Some(2));
    assert!(second.logs().contains("other [window] settings"), "{}", second.logs());
}

/// `--log-format json`: one JSON object per stderr line, and lines about a story carry its id from
/// the stage's span. At `info` nothing shows a story's body.
#[test]
fn json_logs_carry_the_story_id_and_info_logs_never_show_bodies() {
    let dir = tempfile::tempdir().unwrap();
    // The second story repeats the first one's id: dropped, which is logged (at debug) in its span.
    let input = "{\"id\":\"twice\",\"published_at\":\"1987-03-05T12:00:00Z\",\"headline\":\"Oil prices fall\",\"body\":\"SECRET-BODY-TEXT one\"}\n\
                 {\"id\":\"twice\",\"published_at\":\"1987-03-05T13:00:00Z\",\"headline\":\"Oil prices fall\",\"body\":\"SECRET-BODY-TEXT two\"}\n";
    std::fs::write(dir.path().join("in.jsonl"), input).unwrap();
    std::fs::write(dir.path().join("p.toml"), file_pipeline("in.jsonl", "store", "")).unwrap();
    let run = |level: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_bearwatch"))
            .args(["run", "--log-format", "json", "--pipeline", "p.toml"])
            .current_dir(dir.path())
            .env("BEARWATCH_LOG", level)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stderr).unwrap()
    };
    let debug = run("debug");
    let lines: Vec<serde_json::Value> =
        debug.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))).collect();
    assert!(lines.iter().all(|l| l["level"].is_string() && l["timestamp"].is_string() && l["fields"].is_object()));
    let duplicate = lines.iter().find(|l| l["fields"]["message"] == "duplicate id: dropped").expect("the duplicate is logged");
    assert_eq!(duplicate["span"]["name"], "source");
    assert_eq!(duplicate["span"]["id"], "twice", "{duplicate}");
    assert_eq!(duplicate["span"]["offset"], 1, "{duplicate}");

    let info = run("info");
    assert!(!info.is_empty() && info.lines().all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()));
    assert!(!info.contains("SECRET-BODY-TEXT"), "{info}");
}

#[test]
fn two_runs_of_the_same_input_with_different_checkpoint_intervals_raise_the_same_alerts() {
    let dir = tempfile::tempdir().unwrap();
    let rules = common::loose_rules(dir.path());
    let run = |name: &str, checkpoint_interval: &str| {
        let config = format!(
            "[source]\ntype = \"file\"\npath = \"{DEMO_DATA}\"\n\
             [window]\nsize = \"4h\"\nslide = \"1h\"\nallowed_lateness = \"1h\"\n\
             [storage]\npath = \"{name}\"\ncheckpoint_interval = \"{checkpoint_interval}\"\n[run]\nsummary_interval = \"0s\"\n\
             [alerts]\nrules = [{rules:?}]\n[[receivers]]\nname = \"log\"\ntype = \"log\"\n",
            rules = rules.to_str().unwrap()
        );
        let mut pipeline = Pipeline::start(dir.path(), name, &config);
        assert!(pipeline.wait(Duration::from_secs(600)).success(), "{}", pipeline.logs());
        let alerts = "SELECT alert_id, rule, state, topic, started_at, resolved_at, window_start, value, baseline, count, summary \
                      FROM alerts ORDER BY started_at, alert_id, state";
        (query(&pipeline.storage, alerts), query_one(&pipeline.storage, "SELECT count(*) FROM windows WHERE NOT final"))
    };
    // Checkpoints (and with them, before, the rules' live evaluations) every 50 ms in one run, and
    // none but the last in the other.
    let (often, often_live) = run("often", "50ms");
    let (once, once_live) = run("once", "1h");
    assert!(often.len() >= 3, "the demo raises alerts: {often:?}");
    assert_ne!(often_live, once_live, "the checkpoints did differ between the runs");
    assert_eq!(often, once, "same alerts, ids, times and values");
}

/// A second pipeline on a storage another one is using is refused at start: two processes writing
/// one local storage lost and repeated stories with no error from either (3,000 stories in, 2,958
/// rows of 2,912 ids out). Once the first has stopped, the second starts.
#[test]
fn a_second_pipeline_on_the_same_storage_is_refused_while_the_first_runs() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in.jsonl"), stories(300)).unwrap();
    let http = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = file_pipeline("in.jsonl", "store", "")
        .replace("[run]\n", "[run]\nkeep_serving = true\n")
        + &format!("\n[server]\nhttp = \"127.0.0.1:{http}\"\n");
    let mut first = Pipeline::start(dir.path(), "first", &config);
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !std::fs::read_to_string(&first.stderr).unwrap_or_default().contains("still serving") {
        assert!(std::time::Instant::now() < deadline && first.child.try_wait().unwrap().is_none(), "{}", first.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    let second_config = config.replace(&format!("127.0.0.1:{http}"), "127.0.0.1:0");
    let mut second = Pipeline::start(dir.path(), "second", &second_config);
    assert_eq!(second.wait(Duration::from_secs(60)).code(), Some(2), "{}", second.logs());
    let said = std::fs::read_to_string(&second.stderr).unwrap();
    assert!(said.contains(&format!("is in use by another bearwatch process (pid {})", first.child.id())), "{said}");
    // Nor may a repair move parts and rewrite the checkpoint under it.
    let repair = std::process::Command::new(env!("CARGO_BIN_EXE_bearwatch")).args(["storage", "repair", "--storage"]).arg(dir.path().join("store")).output().unwrap();
    let said = String::from_utf8_lossy(&repair.stderr);
    assert_eq!(repair.status.code(), Some(2), "{said}");
    assert!(said.contains(&format!("(pid {})", first.child.id())), "{said}");

    first.signal("TERM");
    assert!(first.wait(Duration::from_secs(30)).success(), "{}", first.logs());
    let mut third = Pipeline::start(dir.path(), "third", &file_pipeline("in.jsonl", "store", ""));
    assert!(third.wait(Duration::from_secs(60)).success(), "{}", third.logs());
    assert_eq!(query(&third.storage, "SELECT count(*), count(DISTINCT id) FROM news"), [["300", "300"]]);
}

/// Two processes writing as one instance of a local storage that instances share numbered their
/// parts alike and committed over each other's checkpoint. The second is refused at start, as is a
/// repair of that instance while it runs; another instance on the same storage starts.
#[test]
fn a_second_process_as_the_same_instance_is_refused_while_the_first_runs() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in.jsonl"), stories(300)).unwrap();
    let http = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let instance = |name: &str, local: &str| {
        file_pipeline("in.jsonl", "shared", "").replace("[storage]\n", &format!("[storage]\ninstance = \"{name}\"\nlocal_path = \"{local}\"\n"))
    };
    let serving = instance("a", "local-1").replace("[run]\n", "[run]\nkeep_serving = true\n") + &format!("\n[server]\nhttp = \"127.0.0.1:{http}\"\n");
    let mut first = Pipeline::start(dir.path(), "first", &serving);
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !std::fs::read_to_string(&first.stderr).unwrap_or_default().contains("still serving") {
        assert!(std::time::Instant::now() < deadline && first.child.try_wait().unwrap().is_none(), "{}", first.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut second = Pipeline::start(dir.path(), "second", &instance("a", "local-2"));
    assert_eq!(second.wait(Duration::from_secs(60)).code(), Some(2), "{}", second.logs());
    let said = std::fs::read_to_string(&second.stderr).unwrap();
    assert!(said.contains(&format!("instance \"a\" of shared is in use by another bearwatch process (pid {})", first.child.id())), "{said}");
    let repair = std::process::Command::new(env!("CARGO_BIN_EXE_bearwatch"))
        .args(["storage", "repair", "--instance", "a", "--storage"])
        .arg(dir.path().join("shared"))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&repair.stderr);
    assert_eq!(repair.status.code(), Some(2), "{said}");
    assert!(said.contains(&format!("(pid {})", first.child.id())), "{said}");

    let mut other = Pipeline::start(dir.path(), "other", &instance("b", "local-3"));
    assert!(other.wait(Duration::from_secs(60)).success(), "{}", other.logs());
    first.signal("TERM");
    assert!(first.wait(Duration::from_secs(30)).success(), "{}", first.logs());
    let sql = std::process::Command::new(env!("CARGO_BIN_EXE_bearwatch"))
        .args(["sql", "--format", "csv", "--storage"])
        .arg(dir.path().join("shared"))
        .arg("SELECT instance, count(*) AS n, count(DISTINCT id) AS ids FROM news GROUP BY instance ORDER BY instance")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&sql.stdout), "instance,n,ids\na,300,300\nb,300,300\n", "{}", String::from_utf8_lossy(&sql.stderr));
}

/// Closed windows kept for corrections remember how copies folded only for the stories a correction
/// can still re-count (`revise_stories`): a closed `all` window of a busy feed folds up to 20,000
/// clusters, and every checkpoint wrote every kept window's again (35,071 stories at 5,000 an hour
/// with `revise_stories = 2000`: 27.5 MB of closed windows in a 36 MB checkpoint, then 1.8 MB).
#[test]
fn closed_windows_remember_copies_only_of_stories_a_correction_can_reach() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in.jsonl"), stories(1000)).unwrap();
    let config = file_pipeline("in.jsonl", "store", "") + "\n[feedback]\nrevise_stories = 50\n";
    let mut pipeline = Pipeline::start(dir.path(), "p", &config);
    assert!(pipeline.wait(Duration::from_secs(120)).success(), "{}", pipeline.logs());
    let checkpoint = common::checkpoint(&pipeline.storage).unwrap();
    let tracked = checkpoint["tracked"].as_array().unwrap();
    assert_eq!(tracked.len(), 50);
    let revisable: std::collections::HashSet<u64> = tracked.iter().map(|t| t["counted"]["cluster"].as_u64().unwrap()).collect();
    let closed = checkpoint["windows"]["closed"].as_array().unwrap();
    assert!(closed.len() > 50, "{} closed windows kept", closed.len());
    let folded: Vec<u64> = closed.iter().flat_map(|pair| pair[1]["folded"].as_object().unwrap().keys().map(|k| k.parse().unwrap())).collect();
    assert!(!folded.is_empty() && folded.iter().all(|cluster| revisable.contains(cluster)), "{} folded, {} of untracked clusters", folded.len(), folded.iter().filter(|c| !revisable.contains(c)).count());
}

/// Stories with long bodies are written out once their text reaches `roll_bytes`, in flight or
/// scored, not only every `checkpoint_interval` or `roll_rows` stories: 8,000 stories of 250 KB
/// bodies (2 GB read in 16 s) held 3.75 GB at peak, in flight and buffered between checkpoints.
#[test]
fn long_bodies_are_written_out_at_roll_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let body = "word ".repeat(40_000);
    let input: String = (0..30)
        .map(|i| {
            let story = serde_json::json!({"id": format!("b{i}"), "published_at": format!("2026-01-01T10:{i:02}:00Z"), "headline": format!("Story {i} shares fall"), "body": body});
            format!("{story}\n")
        })
        .collect();
    std::fs::write(dir.path().join("input.jsonl"), input).unwrap();
    let config = file_pipeline("input.jsonl", "store", "").replace("checkpoint_interval = \"200ms\"", "checkpoint_interval = \"1h\"\nroll_bytes = 1048576");
    let mut pipeline = Pipeline::start(dir.path(), "p", &config);
    assert!(pipeline.wait(Duration::from_secs(300)).success(), "{}", pipeline.logs());
    // 30 stories of 200 KB: a part each time the text read (in flight or scored) passes a MiB (six
    // stories), none left at the end.
    let parts = std::fs::read_dir(pipeline.storage.join("news")).unwrap().filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "parquet")).count();
    assert_eq!(parts, 5);
    assert_eq!(query_one(&pipeline.storage, "SELECT count(DISTINCT id) FROM news"), "30");
    assert_eq!(query_one(&pipeline.storage, "SELECT min(length(body)) FROM news"), body.len().to_string(), "bodies kept whole");
}
