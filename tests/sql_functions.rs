//! Every SQL function of a running pipeline, called over HTTP (JSON, CSV and Arrow answers) and the
//! Postgres wire with edge-case arguments (extreme numbers, NaN, empty and odd text, dates at the
//! calendar's ends, nested lists, maps, structs, the tables' own columns): no call may be the
//! server's failure. A call is answered, or refused as the query's error (HTTP 4xx, a Postgres
//! SQLSTATE other than XX000); the only 500s allowed are DataFusion's own internal errors, which it
//! labels as its bugs. The arguments are drawn by a fixed seed, so a failure reproduces.

mod common;

use std::time::{Duration, Instant};

use common::servers::free_port;
use common::{Pipeline, stories};

const ARGUMENTS: [&str; 52] = [
    "NULL", "0", "-1", "1", "2", "3", "2147483647", "-2147483648", "9223372036854775807", "-9223372036854775808", "1e308", "-1e308",
    "CAST('NaN' AS DOUBLE)", "CAST('inf' AS DOUBLE)", "0.5", "''", "'abc'", "'é€𝄞'", "'%'", "'('", "'hex'", "'base64'", "'%Y-%m-%d'",
    "'day'", "DATE '1970-01-01'", "DATE '9999-12-31'", "TIMESTAMP '2262-04-11T23:47:16'", "TIMESTAMP '1677-09-21T00:12:44'",
    "INTERVAL '1 day'", "INTERVAL '-1 second'", "INTERVAL '0 second'", "[1, 2, 3]", "[]", "make_array(NULL)", "[[1], [2, 3]]", "X'00ff'",
    "true", "CAST(1 AS TINYINT)", "'{\"a\":1}'", "'a,b,,c'", "headline", "published_at", "p_negative", "topic", "tickers",
    "CAST(NULL AS VARCHAR)", "arrow_cast(-1, 'Decimal128(3, 2)')", "named_struct('a', 1)", "map(['k'], [1])", "map([1], [2])",
    "'+14:00'", "'Invalid/Zone'",
];

const ACCEPT: [&str; 3] = ["application/json", "text/csv", "application/vnd.apache.arrow.stream"];

/// xorshift64: the same calls on every run.
struct Draw(u64);

impl Draw {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }

    fn call(&mut self, name: &str) -> String {
        let arity = [0, 1, 1, 2, 2, 2, 3, 3, 4][self.below(9)];
        let arguments: Vec<&str> = (0..arity).map(|_| ARGUMENTS[self.below(ARGUMENTS.len())]).collect();
        format!("\"{name}\"({})", arguments.join(", "))
    }
}

/// A failure that DataFusion itself reports as its bug (a type its kernel does not handle).
fn datafusion_bug(message: &str) -> bool {
    message.contains("bug in DataFusion")
}

#[test]
fn no_function_call_is_the_servers_failure() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in.jsonl"), stories(200)).unwrap();
    let (http, pg) = (free_port(), free_port());
    let config = format!(
        "[source]\ntype = \"file\"\npath = \"in.jsonl\"\n[storage]\npath = \"store\"\n\
         [run]\nsummary_interval = \"0s\"\nkeep_serving = true\nshutdown_timeout = \"2s\"\n\
         [server]\nhttp = \"127.0.0.1:{http}\"\npostgres = \"127.0.0.1:{pg}\"\npostgres_password = \"pw\"\n\
         query_memory_mib = 64\nquery_timeout = \"5s\"\n"
    );
    let mut run = Pipeline::start(dir.path(), "p", &config);
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(Duration::from_secs(60))).build().into();
    let post = |query: &str, accept: &str| -> (u16, String) {
        match agent.post(format!("http://127.0.0.1:{http}/sql")).header("Accept", accept).send(query) {
            Ok(mut response) => (response.status().as_u16(), String::from_utf8_lossy(&response.body_mut().read_to_vec().unwrap_or_default()).into_owned()),
            Err(e) => (0, e.to_string()),
        }
    };
    let deadline = Instant::now() + Duration::from_secs(300);
    while post("SELECT count(*) AS n FROM news", "text/csv").1 != "n\n200\n" {
        assert!(Instant::now() < deadline && run.child.try_wait().unwrap().is_none(), "not scored\n{}", run.logs());
        std::thread::sleep(Duration::from_millis(200));
    }
    let names = |kind: &str| -> Vec<String> {
        let (status, body) =
            post(&format!("SELECT DISTINCT routine_name AS name FROM information_schema.routines WHERE function_type = '{kind}' ORDER BY 1"), "application/json");
        assert_eq!(status, 200, "{body}");
        let rows: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
        rows.iter().map(|r| r["name"].as_str().unwrap().to_string()).collect()
    };
    let (scalar, aggregate, window) = (names("SCALAR"), names("AGGREGATE"), names("WINDOW"));
    assert!(scalar.len() > 200 && aggregate.len() > 30 && window.len() > 5, "{} {} {}", scalar.len(), aggregate.len(), window.len());

    let mut draw = Draw(0x5eed_b3a7);
    let mut queries = Vec::new();
    for name in &scalar {
        for _ in 0..8 {
            queries.push(format!("SELECT {} AS v FROM (SELECT * FROM news LIMIT 3) t", draw.call(name)));
        }
    }
    for name in &aggregate {
        for _ in 0..6 {
            queries.push(format!("SELECT {} AS v FROM (SELECT * FROM news LIMIT 50) t", draw.call(name)));
        }
    }
    for name in &window {
        for _ in 0..6 {
            queries.push(format!("SELECT {} OVER (PARTITION BY topic ORDER BY published_at) AS v FROM (SELECT * FROM news LIMIT 50) t", draw.call(name)));
        }
    }
    let mut failures = Vec::new();
    for (i, query) in queries.iter().enumerate() {
        let (status, body) = post(query, ACCEPT[i % ACCEPT.len()]);
        if (status == 0 || status >= 500) && !datafusion_bug(&body) {
            failures.push(format!("HTTP {status} ({}): {query}: {}", ACCEPT[i % ACCEPT.len()], &body[..body.len().min(300)]));
        }
    }

    // The Postgres wire encodes answers its own way (arrow-pg): every fourth call again there.
    let url = format!("host=127.0.0.1 port={pg} user=bearwatch password=pw dbname=bearwatch connect_timeout=10");
    let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    for query in queries.iter().step_by(4) {
        if let Err(e) = client.simple_query(query) {
            match e.as_db_error() {
                Some(db) if db.code() == &postgres::error::SqlState::INTERNAL_ERROR && !datafusion_bug(db.message()) => {
                    failures.push(format!("Postgres XX000: {query}: {}", db.message()));
                }
                Some(_) => {}
                None => {
                    failures.push(format!("Postgres connection failed: {query}: {e}"));
                    client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
                }
            }
        }
    }
    assert!(failures.is_empty(), "{} of {} calls failed as the server's fault:\n{}", failures.len(), queries.len(), failures.join("\n"));
    assert_eq!(post("SELECT count(*) AS n FROM news", "text/csv").1, "n\n200\n", "the server still answers");
    run.signal("TERM");
    assert!(run.wait(Duration::from_secs(60)).success(), "{}", run.logs());
    eprintln!("{} calls of {} functions, every one answered or refused as the query's error", queries.len(), scalar.len() + aggregate.len() + window.len());
}
