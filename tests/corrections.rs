//! Corrections act at once, against a real running pipeline: stories from a real Kafka broker, a
//! correction through a real HTTP client, and the windows, `applied_labels` and `news` read back over
//! the pipeline's SQL endpoint while it keeps running.

mod common;

use std::time::{Duration, Instant};

use common::{Pipeline, brokers, create_topic_on, produce_to, unique};
use common::api::Api;
use common::servers::free_port;
use serde_json::{Value, json};

/// The open API of these pipelines (no users), each answer checked against docs/openapi.json.
impl Api {
    fn post(&self, path: &str, body: &str) -> (u16, Value) {
        self.call("POST", path, None, Some(body))
    }

    /// Rows of `query`, or none while the server is not up yet.
    fn rows(&self, query: &str) -> Vec<Value> {
        match self.raw("POST", "/sql", &[], Some(query)) {
            Ok((200, _, text)) => serde_json::from_str(&text).unwrap(),
            _ => Vec::new(),
        }
    }

    /// Waits until `query` returns what `done` accepts; panics with the pipeline's logs after 120 s.
    fn wait_for(&self, run: &mut Pipeline, what: &str, query: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let rows = self.rows(query);
            if done(&rows) {
                return rows;
            }
            assert!(run.child.try_wait().unwrap().is_none(), "pipeline exited before {what}\n{}", run.logs());
            assert!(Instant::now() < deadline, "timed out waiting for {what}: {rows:?}\n{}", run.logs());
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn story(id: &str, minute: u32, headline: &str) -> String {
    json!({"id": id, "published_at": format!("2026-11-30T09:{minute:02}:00Z"), "headline": headline, "tickers": []}).to_string() + "\n"
}

/// A pipeline on a new Kafka topic of `partitions`, with the HTTP API, storage `dir/store`.
fn start(dir: &std::path::Path, name: &str, partitions: i32) -> (String, Pipeline, Api) {
    let topic = unique(name);
    create_topic_on(brokers(), &topic, partitions);
    let http = free_port();
    let config = format!(
        "[source]\ntype = \"kafka\"\nbrokers = \"{brokers}\"\ntopics = [\"{topic}\"]\ngroup_id = \"{group}\"\n\
         [window]\nsize = \"1d\"\nallowed_lateness = \"30d\"\n\
         [storage]\npath = \"store\"\ncheckpoint_interval = \"300ms\"\n[run]\nsummary_interval = \"0s\"\n\
         [server]\nhttp = \"127.0.0.1:{http}\"\n",
        brokers = brokers(),
        group = unique("g")
    );
    let run = Pipeline::start(dir, "p", &config);
    let api = Api::new(&format!("http://127.0.0.1:{http}"));
    (topic, run, api)
}

/// The newest row of the day's `all` window: how it counts now.
const ALL_WINDOW: &str = "SELECT n, n_negative, n_neutral, n_positive FROM windows WHERE topic = 'all' ORDER BY updated_at DESC, n DESC LIMIT 1";

#[test]
fn a_correction_recounts_open_windows_at_once_and_reaches_copies_and_near_duplicates_that_arrive_later() {
    let dir = tempfile::tempdir().unwrap();
    let (topic, mut run, api) = start(dir.path(), "corrections", 1);

    let first = dir.path().join("first.jsonl");
    let judged = "Acme Corp shares fall 5% after quarterly results";
    std::fs::write(&first, [story("a", 1, judged), story("b", 2, "Oil prices rise as OPEC cuts output"), story("c", 3, "Central bank holds rates")].concat()).unwrap();
    produce_to(brokers(), &topic, &first);
    let scored = api.wait_for(&mut run, "three scored stories", "SELECT id, sentiment, topic, p_negative FROM news ORDER BY id", |r| r.len() == 3);
    assert_eq!(scored[0]["sentiment"], "negative", "the model's reading of {judged:?} changed: pick another headline");
    let before = api.wait_for(&mut run, "the open window", ALL_WINDOW, |r| r.first().is_some_and(|w| w["n"] == 3))[0].clone();

    // The analyst says story a is not negative: the open window re-counts it within moments.
    let correction = json!({"story_id": "a", "head": "sentiment", "label": "neutral"}).to_string();
    let (status, answer) = api.post("/api/feedback/labels", &correction);
    assert_eq!(status, 201, "{answer}");
    let after = api.wait_for(&mut run, "the window to re-count story a", ALL_WINDOW, |r| {
        r.first().is_some_and(|w| w["n_negative"].as_i64() == before["n_negative"].as_i64().map(|n| n - 1))
    })[0]
        .clone();
    assert_eq!(after["n"], 3, "nothing lost or counted twice");
    assert_eq!(after["n_neutral"].as_i64(), before["n_neutral"].as_i64().map(|n| n + 1));
    let applied = api.wait_for(&mut run, "applied_labels for story a", "SELECT story_id, head, model_label, label, matched FROM applied_labels", |r| !r.is_empty());
    assert_eq!(applied, vec![json!({"story_id": "a", "head": "sentiment", "model_label": "negative", "label": "neutral", "matched": "story"})]);

    // The same story re-sent and the same wording about another company arrive after the correction.
    let later = dir.path().join("later.jsonl");
    let copy = "ACME CORP SHARES FALL 5% AFTER QUARTERLY RESULTS.";
    let near = "Globex Inc shares fall 5% after quarterly results";
    std::fs::write(&later, [story("d", 4, copy), story("e", 5, near), story("f", 6, "Tech stocks tumble on rate fears")].concat()).unwrap();
    produce_to(brokers(), &topic, &later);
    let applied = api.wait_for(
        &mut run,
        "the copy and the near-duplicate to get the correction",
        "SELECT story_id, label, matched, round(shared_words, 2) AS shared FROM applied_labels ORDER BY story_id",
        |r| r.len() == 3,
    );
    assert_eq!(applied[1], json!({"story_id": "d", "label": "neutral", "matched": "exact"}), "no shared_words for an exact copy");
    assert_eq!(applied[2], json!({"story_id": "e", "label": "neutral", "matched": "near", "shared": 0.75}), "{applied:?}");
    let news = api.wait_for(&mut run, "six stories", "SELECT id, sentiment FROM news WHERE id IN ('a', 'd', 'e') ORDER BY id", |r| r.len() == 3);
    assert!(news.iter().all(|s| s["sentiment"] == "negative"), "news keeps the model's scores: {news:?}");
    // The re-sent story is a copy of a: one story in the window, with one copy folded in.
    let newest = "SELECT n, n_negative, copies FROM windows WHERE topic = 'all' ORDER BY updated_at DESC, n DESC LIMIT 1";
    let window = api.wait_for(&mut run, "the window with five stories and a copy", newest, |r| r.first().is_some_and(|w| w["n"] == 5 && w["copies"] == 1))[0].clone();
    let f_negative = api.rows("SELECT count(*) AS n FROM news WHERE id = 'f' AND sentiment = 'negative'")[0]["n"].as_i64().unwrap();
    assert_eq!(window["n_negative"].as_i64(), before["n_negative"].as_i64().map(|n| n - 1 + f_negative), "a (with its copy d) and e count as neutral: {window}");
    // Which label won, queryable: the model's in news, the analyst's where applied_labels says so.
    let won = api.rows(
        "SELECT n.id, coalesce(a.label, n.sentiment) AS label FROM news n \
         LEFT JOIN applied_labels a ON a.story_id = n.id AND a.head = 'sentiment' WHERE n.id IN ('a', 'e') ORDER BY n.id",
    );
    assert_eq!(won, vec![json!({"id": "a", "label": "neutral"}), json!({"id": "e", "label": "neutral"})]);

    run.signal("TERM");
    assert!(run.wait(Duration::from_secs(60)).success(), "{}", run.logs());
}

/// A candidate folder that cannot serve: the bundled encoder with the champion's own heads
/// (`models/refit/heads.json`) and its report, but a golden output no model gives.
fn broken_candidate(dir: &std::path::Path) {
    let models = std::path::Path::new(common::ROOT).join("models");
    std::fs::create_dir_all(dir).unwrap();
    for file in ["model.onnx", "tokenizer.json"] {
        std::fs::copy(models.join(file), dir.join(file)).unwrap();
    }
    std::fs::copy(models.join("refit/heads.json"), dir.join("heads.json")).unwrap();
    let mut labels: Value = serde_json::from_str(&std::fs::read_to_string(models.join("labels.json")).unwrap()).unwrap();
    labels["version"] = json!(format!("{}+refit.test0001", labels["version"].as_str().unwrap()));
    labels["heads"] = json!("heads.json");
    std::fs::write(dir.join("labels.json"), labels.to_string()).unwrap();
    let report = json!({"candidate": common::model_id(&labels), "built_at": "2026-12-01T00:00:00Z", "champion": common::bundled_model(),
        "from": models.display().to_string(), "storage": "", "anchors": 0, "feedback_trained": 0, "trained_until": null,
        "feedback_held_out": 0, "feedback_weight": 3.0, "temperatures": [1.0, 1.0], "comparisons": []});
    std::fs::write(dir.join("report.json"), report.to_string()).unwrap();
    let wrong = json!({"text": "Oil prices fall", "sentiment": [0.0, 0.0, 1.0]}).to_string() + "\n";
    std::fs::write(dir.join("golden.jsonl"), wrong).unwrap();
}

/// A candidate whose encoder `model retrain --encoder` fine-tuned (one epoch) on a review of stock
/// splits, which the champion reads as neutral or negative and analysts call positive; checked to
/// be the champion's graph op for op with new encoder weights, its int8 export close to the fp32
/// weights it came from, and a report that compares it on every domain.
fn fine_tuned(work: &std::path::Path, out: &std::path::Path) -> String {
    let storage = work.join("reviews");
    let file = work.join("splits.jsonl");
    common::write_stock_split_review(&file, &["two-for-one", "three-for-one", "three-for-two", "five-for-four"]);
    let storage = storage.to_str().unwrap();
    let (code, _, err) = bearwatch(&["feedback", "import", "--storage", storage, "--analyst", "ana", file.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let (code, report_md, err) = bearwatch(&["model", "retrain", "--storage", storage, "--out", out.to_str().unwrap(), "--encoder", "--epochs", "1"]);
    assert_eq!(code, 0, "{err}");
    let report: Value = serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let tuning = &report["tuning"];
    assert_eq!((tuning["epochs"].as_array().map(Vec::len), tuning["kept_epoch"].as_u64()), (Some(2), Some(1)), "the epoch was kept: {tuning}");
    assert_eq!((tuning["stopping_feedback"].as_u64(), report["feedback_held_out"].as_u64()), (Some(6), Some(8)), "{report}");
    // The stated tolerance of the int8 export against the fp32 weights it was quantized from.
    let export = &tuning["export"];
    assert!(export["agreement"].as_f64() >= Some(0.9) && export["mean_abs_difference"].as_f64() <= Some(0.05), "{export}");
    assert!(report_md.contains("Fine-tuned the encoder"), "{report_md}");
    for domain in ["phrasebank", "sentfin", "tweets_sentiment", "reuters", "tweets_topic"] {
        let set = format!("eval/{domain}");
        assert!(report["comparisons"].as_array().unwrap().iter().any(|c| c["set"] == set.as_str()), "{set}: {report}");
    }
    // The same graph, op for op, with new encoder weights and the frozen embeddings unchanged.
    let parse = |dir: &std::path::Path| bearwatch::classify::onnx::Model::parse(std::fs::read(dir.join("model.onnx")).unwrap()).unwrap();
    let (champion, tuned) = (parse(&std::path::Path::new(common::ROOT).join("models")), parse(out));
    let ops = |m: &bearwatch::classify::onnx::Model| m.nodes.iter().map(|n| (n.name.clone(), n.op_type.clone(), n.inputs.clone())).collect::<Vec<_>>();
    assert_eq!(ops(&champion), ops(&tuned));
    let values = |m: &bearwatch::classify::onnx::Model, name: &str| m.initializer(name).unwrap().data.clone();
    assert_ne!(values(&champion, "model.layers.0.query.bias"), values(&tuned, "model.layers.0.query.bias"), "the encoder moved");
    assert_eq!(values(&champion, "model.word.weight_int8"), values(&tuned, "model.word.weight_int8"));
    report["candidate"].as_str().unwrap().to_string()
}

fn bearwatch(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_bearwatch")).args(args).output().unwrap();
    (out.status.code().unwrap(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn a_promoted_champion_serves_without_a_restart_and_a_rollback_swaps_back_with_no_story_lost_or_scored_twice() {
    let dir = tempfile::tempdir().unwrap();
    let (topic, mut run, api) = start(dir.path(), "swap", 2);
    let storage = dir.path().join("store");
    let storage = storage.to_str().unwrap();
    let batch = |name: &str, from: usize, n: usize| {
        let file = dir.path().join(name);
        std::fs::write(&file, (from..from + n).map(|i| story(&format!("s{i:04}"), (i % 60) as u32, &format!("Story {i}: shares move"))).collect::<String>()).unwrap();
        produce_to(brokers(), &topic, &file);
    };
    let count = "SELECT count(*) AS n, count(DISTINCT id) AS ids FROM news";
    batch("a.jsonl", 0, 200);
    api.wait_for(&mut run, "the first stories", count, |r| r.first().is_some_and(|c| c["n"].as_i64() > Some(0)));

    // A folder that does not reproduce its golden outputs is refused before the alias moves, so a
    // restart could not serve it either; the champion serves on.
    let broken = dir.path().join("broken");
    broken_candidate(&broken);
    let (code, _, err) = bearwatch(&["model", "promote", broken.to_str().unwrap(), "--storage", storage, "--by", "ana"]);
    assert!(code == 2 && err.contains("cannot serve") && err.contains("golden output"), "{code} {err}");
    let (_, aliases, _) = bearwatch(&["sql", "--storage", storage, "--format", "csv", "SELECT count(*) AS n FROM model_aliases"]);
    assert_eq!(aliases, "n\n0\n", "the alias did not move");
    let metrics = || api.raw("GET", "/metrics", &[], None).unwrap().2;

    // A good one is swapped in while a backlog is being scored.
    let swapped = |run: &Pipeline, n: u32| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !metrics().contains(&format!("bearwatch_model_swaps_total{{outcome=\"swapped\"}} {n}")) {
            assert!(Instant::now() < deadline, "swap {n} did not happen\n{}", run.logs());
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let good = dir.path().join("good");
    let id = fine_tuned(dir.path(), &good);
    assert!(id.contains("+tune."), "{id}");
    batch("b.jsonl", 200, 600);
    // This time an admin promotes over HTTP (the API is open here: everyone is an admin). Forced,
    // with its reason, only if its own report says worse (one epoch on a few labels can sit at the
    // edge of the gate's interval; tests/feedback.rs tests the gate itself).
    let report: Value = serde_json::from_str(&std::fs::read_to_string(good.join("report.json")).unwrap()).unwrap();
    let worse = report["comparisons"].as_array().unwrap().iter().any(|c| c["worse"] == true);
    let request = if worse { json!({"dir": good, "force": true, "reason": "splits matter more"}) } else { json!({"dir": good}) };
    let (status, answer) = api.post("/api/models/promote", &request.to_string());
    assert_eq!(status, 200, "{answer}");
    assert_eq!((answer["model"].as_str(), answer["set_by"].as_str()), (Some(id.as_str()), Some("anonymous")), "{answer}");
    swapped(&run, 1);
    batch("c.jsonl", 800, 100);
    let by_model = "SELECT model, count(*) AS n FROM news WHERE id >= 's0800' AND id < 's0900' GROUP BY model";
    let rows = api.wait_for(&mut run, "the stories after the swap", by_model, |r| r.first().is_some_and(|c| c["n"] == 100));
    assert_eq!(rows, vec![json!({"model": id, "n": 100})], "every story after the swap is the new champion's");
    let (status, answer) = api.post("/api/models/rollback", r#"{"reason": "test"}"#);
    assert_eq!(status, 200, "{answer}");
    assert!(answer["reason"].as_str().unwrap().starts_with(&format!("rollback from {id}: test")), "{answer}");
    swapped(&run, 2);
    batch("d.jsonl", 900, 100);
    let rows = api.wait_for(&mut run, "all 1,000 stories", count, |r| r.first().is_some_and(|c| c["n"] == 1000));
    assert_eq!(rows[0]["ids"], 1000, "no story lost or scored twice across both swaps");
    let back = api.rows("SELECT model, count(*) AS n FROM news WHERE id >= 's0900' GROUP BY model");
    assert_eq!(back, vec![json!({"model": common::bundled_model(), "n": 100})], "rolled back in one step");
    run.signal("TERM");
    assert!(run.wait(Duration::from_secs(60)).success(), "{}", run.logs());
}
