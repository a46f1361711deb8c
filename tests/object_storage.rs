//! Tables, checkpoint and journals on a real S3-compatible server (tests/s3_server.py): a pipeline
//! killed with -9 mid-stream and restarted loses and doubles nothing and its windows equal a local
//! run's; SQL (CLI and HTTP) reads the bucket; two writers on one prefix cannot both commit.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use bearwatch::config::env::EnvString;
use bearwatch::storage::{Location, S3Config, Storage, StorageError};
use common::api::Api;
use common::servers::{S3Server, free_port};
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
        if s3.checkpoint("market").is_some_and(|c| scored(&c) >= 200) {
            break;
        }
        assert!(first.child.try_wait().unwrap().is_none(), "the pipeline ended before a checkpoint on S3\n{}", first.logs());
        assert!(Instant::now() < deadline, "no checkpoint on S3\n{}", first.logs());
        std::thread::sleep(Duration::from_millis(20));
    }
    first.signal("KILL");
    first.wait(Duration::from_secs(10));
    let at_kill = scored(&s3.checkpoint("market").unwrap());
    assert!(at_kill < total as u64, "the kill came after the last story ({at_kill}); nothing was interrupted");

    // Restarted with the HTTP server kept up: /sql reads the bucket too.
    let http = free_port();
    let serving = format!("{settings}[run]\nkeep_serving = true\nshutdown_timeout = \"2s\"\n[server]\nhttp = \"127.0.0.1:{http}\"\n");
    let mut second = Pipeline::start(dir.path(), "second", &config(news, remote, &serving));
    loop {
        if s3.checkpoint("market").is_some_and(|c| scored(&c) >= total as u64) {
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
    // The parts and the checkpoint are plain objects that any engine reads: the layout is the local one.
    assert!(s3.get("market/news/part-00000000.parquet").is_some_and(|b| b.starts_with(b"PAR1")));
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
}

#[test]
fn two_writers_on_one_prefix_cannot_both_commit() {
    let s3 = S3Server::start("fence");
    let text = |t: &str| Some(EnvString::expand(t).unwrap());
    let settings =
        S3Config { endpoint: text(&s3.endpoint), access_key_id: text("test"), secret_access_key: text("test"), region: text("us-east-1"), ..S3Config::default() };
    let at = |prefix: &str| Location::parse(&format!("s3://fence/{prefix}"), &settings).unwrap();
    let state = serde_json::json!({"offsets": {"news": {"0": 10}}});

    // Both read "no checkpoint"; the first commit wins, the second is fenced off.
    let (mut a, _) = Storage::open::<serde_json::Value>(&at("one"), false).unwrap();
    let (mut b, _) = Storage::open::<serde_json::Value>(&at("one"), false).unwrap();
    a.commit(&state).unwrap();
    let err = b.commit(&state).unwrap_err();
    assert!(matches!(err, StorageError::Fenced { .. }), "{err}");
    assert!(err.to_string().contains("two pipelines share this storage"), "{err}");
    // The winner goes on committing over its own versions.
    a.commit(&state).unwrap();

    // One that restarted and read the newest checkpoint takes over; the one before it cannot commit.
    let (mut c, restored) = Storage::open::<serde_json::Value>(&at("one"), false).unwrap();
    assert_eq!(restored.unwrap()["offsets"]["news"]["0"], 10);
    c.commit(&state).unwrap();
    assert!(matches!(a.commit(&state), Err(StorageError::Fenced { .. })));

    // An unreachable store is a clear error, after the client's retries, not a hang.
    let closed = S3Config { endpoint: text(&format!("http://127.0.0.1:{}", free_port())), retries: 1, ..settings.clone() };
    let started = Instant::now();
    let err = Storage::open::<serde_json::Value>(&Location::parse("s3://fence/gone", &closed).unwrap(), false).err().unwrap();
    assert!(err.to_string().contains("s3://fence/gone/checkpoint.json"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(30), "{:?}", started.elapsed());
}
