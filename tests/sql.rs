//! SQL from the command line (`bearwatch sql --storage`, `--url`) and over HTTP (`POST /sql`) on a
//! real pipeline's tables: answers, formats, errors with positions, auth, and read-only refusals.

mod common;

use std::net::TcpListener;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Pipeline, stories};

const FORBIDDEN: &str = include_str!("sql/forbidden.sql");

fn forbidden() -> Vec<&'static str> {
    FORBIDDEN.lines().filter(|l| !l.starts_with("--") && !l.trim().is_empty()).collect()
}

fn sql(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_bearwatch")).arg("sql").args(args).output().unwrap();
    (out.status.code().unwrap(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn pipeline(extra: &str) -> String {
    format!(
        "[source]\ntype = \"file\"\npath = \"in.jsonl\"\n{extra}\n[window]\nsize = \"6h\"\n[storage]\npath = \"store\"\n\
         checkpoint_interval = \"300ms\"\n[run]\nsummary_interval = \"0s\"\n"
    )
}

#[test]
fn the_cli_answers_over_stored_tables_and_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in.jsonl"), stories(600)).unwrap();
    let mut run = Pipeline::start(dir.path(), "p", &pipeline(""));
    assert!(run.wait(Duration::from_secs(120)).success(), "{}", run.logs());
    let storage = run.storage.to_str().unwrap().to_string();

    let (code, out, err) = sql(&["--storage", &storage, "SELECT topic, avg(neg_share) FROM windows GROUP BY topic"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("+") && out.contains("avg(windows.neg_share)") && out.contains("| all "), "{out}");

    let (_, out, _) = sql(&["--storage", &storage, "--format", "csv", "SELECT count(*) AS n, count(DISTINCT id) AS ids FROM news"]);
    assert_eq!(out, "n,ids\n600,600\n");
    let (_, out, _) = sql(&["--storage", &storage, "--format", "json", "SELECT sum(n + copies) AS n FROM windows WHERE final AND topic = 'all'"]);
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(rows, serde_json::json!([{"n": 600}]));

    // Every column of a table, lists included (`tickers`), and a list made by the query, as CSV.
    let (code, out, err) = sql(&["--storage", &storage, "--format", "csv", "SELECT * FROM news"]);
    assert!(code == 0 && out.starts_with("id,") && out.contains(",tickers,"), "{err}{}", &out[..out.len().min(300)]);
    let (code, out, err) = sql(&["--storage", &storage, "--format", "csv", "SELECT string_to_array('Oil falls', ' ') AS words"]);
    assert_eq!((code, out.as_str()), (0, "words\n\"[\"\"Oil\"\",\"\"falls\"\"]\"\n"), "{err}");

    let (code, _, err) = sql(&["--storage", &storage, "SELECT headline\nFROM news\nWHER topic = 'energy'"]);
    assert_eq!(code, 2);
    assert!(err.contains("Line: 3") && err.trim_end().ends_with('^'), "the position is shown: {err}");

    for statement in forbidden() {
        let (code, out, err) = sql(&["--storage", &storage, statement]);
        assert_eq!(code, 2, "{statement}: {out}{err}");
    }
    assert!(!std::path::Path::new("/tmp/bearwatch-leak.csv").exists());
    let (_, out, _) = sql(&["--storage", &storage, "--format", "csv", "SELECT count(*) AS n FROM news"]);
    assert_eq!(out, "n\n600\n", "nothing was changed");
}

#[test]
fn http_answers_json_csv_and_arrow_with_auth_and_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in.jsonl"), stories(600)).unwrap();
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    // Paced so that the pipeline (and its server) is still running while the queries are made.
    let config = pipeline("speed = 10000") + &format!("[server]\nhttp = \"127.0.0.1:{port}\"\nauth_token = \"k3y-0123456789abcdef\"\n");
    let mut run = Pipeline::start(dir.path(), "p", &config);
    let url = format!("http://127.0.0.1:{port}");
    // Every answer is also checked against docs/openapi.json.
    let api = common::api::Api::new(&url);
    let post = |query: &str, accept: &str, token: &str| {
        let auth = format!("Bearer {token}");
        let (status, _, body) = api.bytes("POST", "/sql", &[("Accept", accept), ("Authorization", &auth)], Some(query)).unwrap();
        (status, body)
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = api.raw("POST", "/sql", &[("Authorization", "Bearer k3y-0123456789abcdef")], Some("SELECT count(*) AS n FROM news"));
        if ready.is_ok_and(|(status, _, text)| status == 200 && text != "[{\"n\":0}]") {
            break;
        }
        assert!(Instant::now() < deadline, "no rows became queryable\n{}", run.logs());
        std::thread::sleep(Duration::from_millis(100));
    }

    // Parquet parts and unflushed rows together, across checkpoints: never a story twice.
    for _ in 0..20 {
        let (_, body) = post("SELECT count(*) - count(DISTINCT id) AS twice FROM news", "text/csv", "k3y-0123456789abcdef");
        assert_eq!(String::from_utf8(body).unwrap(), "twice\n0\n");
        std::thread::sleep(Duration::from_millis(100));
    }

    let (status, body) = post("SELECT topic, count(*) AS n FROM news GROUP BY topic ORDER BY topic", "application/json", "k3y-0123456789abcdef");
    assert_eq!(status, 200);
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&body).unwrap();
    assert!(rows.iter().all(|r| r["topic"].is_string() && r["n"].as_u64().unwrap() > 0));
    let (_, body) = post("SELECT 1 AS one, 'x' AS s", "text/csv", "k3y-0123456789abcdef");
    assert_eq!(String::from_utf8(body).unwrap(), "one,s\n1,x\n");
    let (_, body) = post("SELECT topic, n FROM windows LIMIT 3", "application/vnd.apache.arrow.stream", "k3y-0123456789abcdef");
    let reader = datafusion::arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(body), None).unwrap();
    assert_eq!(reader.schema().field(1).name(), "n");

    assert_eq!(post("SELECT 1", "application/json", "wrong").0, 401);
    let (status, body) = post("SELECT nope FROM news", "application/json", "k3y-0123456789abcdef");
    assert_eq!(status, 400);
    let error: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert!(error["error"].as_str().unwrap().contains("nope"), "{error}");
    // A failure on the query's own values is the query's error too, not the server's.
    for query in ["SELECT 1 / 0", "SELECT count(*) FROM news WHERE regexp_like(headline, '(a{1000}){1000}')"] {
        let (status, body) = post(query, "application/json", "k3y-0123456789abcdef");
        assert!(status == 400 && String::from_utf8_lossy(&body).contains("failed on a value"), "{query}: {status} {}", String::from_utf8_lossy(&body));
    }
    for statement in forbidden() {
        let (status, body) = post(statement, "application/json", "k3y-0123456789abcdef");
        assert!(status == 403 || status == 400, "{statement}: {status} {}", String::from_utf8_lossy(&body));
    }

    // The CLI against the running server.
    let out = Command::new(env!("CARGO_BIN_EXE_bearwatch"))
        .args(["sql", "--url", &url, "--format", "csv", "SELECT 2 AS two"])
        .env("BEARWATCH_TOKEN", "k3y-0123456789abcdef")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "two\n2\n", "{}", String::from_utf8_lossy(&out.stderr));
    let out = Command::new(env!("CARGO_BIN_EXE_bearwatch")).args(["sql", "--url", &url, "SELECT 2"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "no token");

    run.signal("TERM");
    assert!(run.wait(Duration::from_secs(30)).success());
}

#[test]
fn rows_are_queryable_within_a_second_before_any_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in.jsonl"), stories(600)).unwrap();
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = pipeline("speed = 10000").replace("checkpoint_interval = \"300ms\"", "checkpoint_interval = \"1h\"")
        + &format!("[server]\nhttp = \"127.0.0.1:{port}\"\n");
    let mut run = Pipeline::start(dir.path(), "p", &config);
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let count = |query: &str| -> Option<u64> {
        let mut response = agent.post(format!("http://127.0.0.1:{port}/sql")).header("Accept", "text/csv").send(query).ok()?;
        let text = response.body_mut().read_to_string().ok()?;
        text.lines().nth(1)?.parse().ok()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while count("SELECT count(*) FROM news").unwrap_or(0) == 0 {
        assert!(Instant::now() < deadline, "no live rows\n{}", run.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    let parts = std::fs::read_dir(dir.path().join("store/news")).unwrap().count();
    assert_eq!(parts, 0, "the rows came from memory, not from a checkpoint");
    assert!(count("SELECT count(*) FROM windows WHERE topic = 'all' AND NOT final").unwrap() > 0, "open windows are visible too");
    assert_eq!(count("SELECT count(*) - count(DISTINCT id) FROM news"), Some(0));

    // The operational endpoints of the same server.
    let get = |path: &str| {
        let mut response = agent.get(format!("http://127.0.0.1:{port}{path}")).call().unwrap();
        (response.status().as_u16(), response.body_mut().read_to_string().unwrap())
    };
    assert_eq!(get("/health"), (200, "ok\n".to_string()));
    assert_eq!(get("/ready"), (200, "ready\n".to_string()));
    let (status, metrics) = get("/metrics");
    assert_eq!(status, 200);
    for name in ["bearwatch_stage_received_total{stage=\"source\"}", "bearwatch_stage_sent_total{stage=\"classify\"}", "bearwatch_classify_batch_seconds_bucket"] {
        assert!(metrics.contains(name), "{name} missing from /metrics:\n{metrics}");
    }
    run.signal("TERM");
    assert!(run.wait(Duration::from_secs(30)).success(), "{}", run.logs());
}
