//! The Postgres wire protocol against a running pipeline: Debian's `psql` (simple protocol, `\d`,
//! the catalog queries Grafana sends, password auth) and the `postgres` driver (extended protocol
//! with parameters); every write or file access refused.

mod common;

use std::net::TcpListener;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Pipeline, stories};
use postgres::error::SqlState;

const FORBIDDEN: &str = include_str!("sql/forbidden.sql");

fn psql(port: u16, password: &str, command: &str) -> (bool, String) {
    let out = Command::new("psql")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "bearwatch", "-d", "bearwatch", "-X", "-A", "-t", "-c", command])
        .env("PGPASSWORD", password)
        .env("PGCONNECT_TIMEOUT", "5")
        .output()
        .expect("psql (Debian postgresql-client) is needed; .ci/run installs it");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// Logs in over a raw socket and starts a Query message of `length` bytes; what the server sent
/// after the login, up to its close (a server waiting for the rest sends nothing and times out).
fn oversized_query(port: u16, password: &str, length: u32) -> String {
    use std::io::{Read, Write};
    let mut socket = common::pgwire::login(std::net::TcpStream::connect(("127.0.0.1", port)).unwrap(), password);
    socket.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    // The header and a first part of the body, as a client writing it would have sent by now.
    socket.write_all(&[&[b'Q'][..], &length.to_be_bytes(), &vec![b'x'; 256 << 10]].concat()).unwrap();
    let mut answer = Vec::new();
    let _ = socket.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

/// One connection holds at most 1,000 prepared statements, portals and cursors, of at most 8 MiB
/// of text and parameters; past either bound the next one is refused with 54000, and closing some
/// lets the connection go on.
fn held_statements_portals_and_cursors_are_bounded(url: &str) {
    let is_limit = |err: postgres::Error| err.as_db_error().is_some_and(|db| db.code() == &SqlState::PROGRAM_LIMIT_EXCEEDED && db.message().contains("close some"));
    let mut client = postgres::Client::connect(url, postgres::NoTls).unwrap();
    // The driver names each prepared statement and closes it when it is dropped.
    let mut statements: Vec<postgres::Statement> = (0..1000).map(|i| client.prepare(&format!("SELECT {i}")).unwrap()).collect();
    assert!(is_limit(client.prepare("SELECT 'one more'").unwrap_err()));
    assert!(is_limit(client.batch_execute("BEGIN; DECLARE c CURSOR FOR SELECT 1").unwrap_err()));
    client.batch_execute("ROLLBACK").unwrap();
    statements.truncate(990);
    let freed = client.prepare("SELECT 1001").unwrap();
    let one_more: i64 = client.query_one(&freed, &[]).unwrap().get(0);
    assert_eq!(one_more, 1001);
    drop(statements);
    // Portals bound with 1 MB parameters, each under the message bound, fill the 8 MiB.
    let mut transaction = client.transaction().unwrap();
    let statement = transaction.prepare("SELECT CAST(length($1) AS INT)").unwrap();
    let big = "x".repeat(1_000_000);
    let portals: Vec<postgres::Portal> = (0..8).map(|_| transaction.bind(&statement, &[&big]).unwrap()).collect();
    assert!(is_limit(transaction.bind(&statement, &[&big]).err().expect("a ninth portal is refused")));
    transaction.rollback().unwrap();
    drop(portals);
    let mut transaction = client.transaction().unwrap();
    let portal = transaction.bind(&statement, &[&big]).unwrap();
    let length: i32 = transaction.query_portal(&portal, 1).unwrap()[0].get(0);
    assert_eq!(length, 1_000_000, "a transaction's end frees its portals");
}

/// 64 connections that never log in do not keep psql out: the one logging in the longest is closed
/// for it. 64 logged-in sessions (the caller's own and 63 more) keep their places, and a 65th is
/// refused until one leaves.
fn logging_in_connections_make_room_and_logged_in_ones_keep_theirs(port: u16, url: &str) {
    let idle: Vec<std::net::TcpStream> = (0..64).map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).unwrap()).collect();
    let (ok, out) = psql(port, "s3cret", "SELECT 1");
    assert!(ok && out.trim() == "1", "psql behind 64 connections that never logged in: {out}");
    drop(idle);
    // Connections closed just before (the idle ones, an earlier test's client) free their places as
    // the server reads their end: a refused connect is tried again.
    let deadline = Instant::now() + Duration::from_secs(30);
    let connect = || loop {
        match postgres::Client::connect(url, postgres::NoTls) {
            Ok(client) => break client,
            Err(e) => assert!(Instant::now() < deadline, "a session could not connect: {e}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut sessions: Vec<postgres::Client> = (0..63).map(|_| connect()).collect();
    let (ok, out) = psql(port, "s3cret", "SELECT 1");
    assert!(!ok, "a 65th session got in: {out}");
    for session in &mut sessions {
        assert!(session.simple_query("SELECT 1").is_ok(), "a logged-in session lost its place");
    }
    drop(sessions.pop());
    let deadline = Instant::now() + Duration::from_secs(30);
    while !psql(port, "s3cret", "SELECT 1").0 {
        assert!(Instant::now() < deadline, "no place came free when a session left");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn psql_and_a_driver_query_a_running_pipeline_read_only() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in.jsonl"), stories(600)).unwrap();
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    // SAFETY: only this test reads this variable.
    unsafe { std::env::set_var("BEARWATCH_TEST_PG_PASSWORD", "s3cret") };
    let config = format!(
        "[source]\ntype = \"file\"\npath = \"in.jsonl\"\nspeed = 8000\n[window]\nsize = \"6h\"\n[storage]\npath = \"store\"\n\
         checkpoint_interval = \"300ms\"\n[run]\nsummary_interval = \"0s\"\n[server]\npostgres = \"127.0.0.1:{port}\"\n\
         query_timeout = \"2s\"\npostgres_password = \"${{BEARWATCH_TEST_PG_PASSWORD}}\"\n"
    );
    let mut run = Pipeline::start(dir.path(), "p", &config);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (ok, out) = psql(port, "s3cret", "SELECT count(*) FROM news");
        if ok && out.trim().parse::<u64>().is_ok_and(|n| n > 0) {
            break;
        }
        assert!(Instant::now() < deadline, "psql never got rows: {out}\n{}", run.logs());
        std::thread::sleep(Duration::from_millis(200));
    }

    let (ok, out) = psql(port, "s3cret", "\\d");
    let tables = ["alert_verdicts", "alerts", "applied_labels", "label_feedback", "late", "missed_events", "model_aliases", "models", "news", "notifications", "shadow_news", "windows"];
    assert!(ok && tables.iter().all(|t| out.contains(&format!("public|{t}|table"))), "{out}");
    let (ok, out) = psql(port, "s3cret", "\\d windows");
    assert!(ok && out.contains("neg_share|double precision") && out.contains("window_start|timestamp with time zone"), "{out}");
    // What Grafana's Postgres data source asks when it lists tables and columns.
    let (ok, out) = psql(port, "s3cret", "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1");
    assert!(ok && out.lines().collect::<Vec<_>>() == tables, "{out}");
    let (ok, out) = psql(port, "s3cret", "SELECT column_name FROM information_schema.columns WHERE table_name = 'news' AND column_name = 'headline'");
    assert!(ok && out.trim() == "headline", "{out}");
    let (ok, out) = psql(port, "wrong", "SELECT 1");
    assert!(!ok && out.contains("authentication failed"), "{out}");

    // The extended protocol with parameters, through a real driver.
    let url = format!("host=127.0.0.1 port={port} user=bearwatch password=s3cret dbname=bearwatch connect_timeout=5");
    let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let all: i64 = client.query_one("SELECT count(*) FROM news", &[]).unwrap().get(0);
    let rows = client.query("SELECT topic, count(*) AS n FROM news WHERE p_negative >= $1 GROUP BY topic ORDER BY topic", &[&0.5f32]).unwrap();
    let negative: i64 = rows.iter().map(|r| r.get::<_, i64>("n")).sum();
    assert!(negative > 0 && negative < all, "{negative} of {all}");
    let one: i64 = client.query_one("SELECT count(*) FROM news WHERE topic = $1 AND id <> $2", &[&"earnings", &"none"]).unwrap().get(0);
    assert!(one > 0);

    for statement in FORBIDDEN.lines().filter(|l| !l.starts_with("--") && !l.trim().is_empty()) {
        let (ok, out) = psql(port, "s3cret", statement);
        assert!(!ok && out.contains("ERROR"), "psql: {statement}: {out}");
        assert!(client.execute(statement, &[]).is_err(), "driver: {statement}");
    }
    assert!(!std::path::Path::new("/tmp/bearwatch-leak.csv").exists());
    let (_, out) = psql(port, "s3cret", "SELECT count(*) FROM (SELECT 1 FROM news LIMIT 1)");
    assert_eq!(out.trim(), "1", "the tables are still there");

    // The provisioned Grafana dashboard's SQL panels run over this interface (Grafana's
    // `$__timeFilter` macro expanded the way Grafana does).
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/grafana/dashboards/bearwatch.json")).unwrap()).unwrap();
    let mut panels = 0;
    for target in dashboard["panels"].as_array().unwrap().iter().flat_map(|p| p["targets"].as_array().unwrap()) {
        let Some(sql) = target["rawSql"].as_str() else { continue };
        let mut sql = sql.to_string();
        while let Some(start) = sql.find("$__timeFilter(") {
            let end = start + sql[start..].find(')').unwrap();
            let column = &sql[start + 14..end];
            sql = format!("{}{column} BETWEEN '1987-01-01T00:00:00Z' AND '2030-01-01T00:00:00Z'{}", &sql[..start], &sql[end + 1..]);
        }
        let (ok, out) = psql(port, "s3cret", &sql);
        assert!(ok, "Grafana panel query failed: {sql}\n{out}");
        panels += 1;
    }
    assert!(panels >= 4);

    // Each failure under the SQLSTATE Postgres gives it, with the message the HTTP API gives.
    let failures = [
        ("SELEC 1", SqlState::SYNTAX_ERROR, "Expected"),
        ("SELECT no_such_column FROM news", SqlState::UNDEFINED_COLUMN, "no_such_column"),
        ("SELECT 1 FROM no_such_table", SqlState::UNDEFINED_TABLE, "no_such_table"),
        ("SELECT 1 / 0", SqlState::DIVISION_BY_ZERO, "the query failed on a value"),
        ("SELECT CAST('abc' AS INT)", SqlState::INVALID_TEXT_REPRESENTATION, "the query failed on a value"),
        ("SELECT regexp_like(headline, '(') FROM news", SqlState::INVALID_REGULAR_EXPRESSION, "the query failed on a value"),
        ("SELECT cardinality(array_repeat(1, 2000000000))", SqlState::OUT_OF_MEMORY, "query_memory_mib"),
        ("INSERT INTO news SELECT * FROM news", SqlState::READ_ONLY_SQL_TRANSACTION, "read only"),
        ("SELECT map(['k'], [1]) AS m", SqlState::FEATURE_NOT_SUPPORTED, "has no Postgres type"),
        ("SELECT from_unixtime(0, 'nowhere') AS t", SqlState::INVALID_TEXT_REPRESENTATION, "the query failed on a value"),
    ];
    for (sql, code, message) in failures {
        let err = client.query(sql, &[]).unwrap_err();
        let db = err.as_db_error().unwrap_or_else(|| panic!("{sql}: {err:?}"));
        assert_eq!((db.code(), db.message().contains(message)), (&code, true), "{sql}: {db:?}");
        let (ok, out) = psql(port, "s3cret", sql);
        assert!(!ok && out.contains(message), "psql: {sql}: {out}");
    }
    assert!(client.query_one("SELECT 1", &[]).is_ok(), "the connection goes on after its failures");

    // Where a statement went wrong, as Postgres says it (a character index, which psql shows under
    // the line): a syntax error on both protocols, a planner's error in a simple query.
    let mut at = |sql: &str| match client.query(sql, &[]).unwrap_err().as_db_error().and_then(|db| db.position().cloned()) {
        Some(postgres::error::ErrorPosition::Original(index)) => Some(index),
        _ => None,
    };
    assert_eq!(at("SELECT * FORM news"), Some(10), "at FORM");
    assert_eq!(at("SELECT 'é',\n 'ü' FORM news"), Some(23), "in characters, across lines: at news");
    let (ok, out) = psql(port, "s3cret", "SELECT * FORM news");
    assert!(!ok && out.contains("found: FORM at Line: 1, Column: 10\nLINE 1: SELECT * FORM news\n                 ^"), "psql: {out}");
    let (ok, out) = psql(port, "s3cret", "SELECT 1 FROM no_such_table");
    assert!(!ok && out.contains("not found\nLINE 1: SELECT 1 FROM no_such_table\n                      ^"), "psql: {out}");

    // A message's size is bounded as its header arrives: a Query declaring 100 MB is refused with
    // 54000 and its connection closed before the body is read; one under the bound (a 900 KB bound
    // parameter, read across many socket reads) is served, and other connections go on.
    let refused = oversized_query(port, "s3cret", 100 << 20);
    assert!(refused.contains("54000") && refused.contains("over the limit of 1048576 bytes"), "{refused}");
    // A Bind whose parameter count runs past its end (pgwire's decoder panicked on it) is the
    // client's protocol violation: FATAL 08P01, and no panic in the log.
    {
        use std::io::{Read, Write};
        let mut socket = common::pgwire::login(std::net::TcpStream::connect(("127.0.0.1", port)).unwrap(), "s3cret");
        socket.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        socket.write_all(&common::pgwire::message(b'B', b"\0\0\x00\x01")).unwrap();
        let mut answer = Vec::new();
        let _ = socket.read_to_end(&mut answer);
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.contains("08P01") && answer.contains("invalid message"), "{answer}");
    }
    let long: i32 = client.query_one("SELECT CAST(length($1) AS INT)", &[&"é".repeat(450_000)]).unwrap().get(0);
    assert_eq!(long, 450_000);
    let (ok, out) = psql(port, "s3cret", "SELECT 1");
    assert!(ok && out.trim() == "1", "{out}");

    held_statements_portals_and_cursors_are_bounded(&url);
    logging_in_connections_make_room_and_logged_in_ones_keep_theirs(port, &url);

    // `[server] query_timeout` bounds a query's execution on this interface too.
    let endless = "SELECT count(*) FROM range(1, 1000000000000) WHERE value % 7 = 3";
    let started = Instant::now();
    let (ok, out) = psql(port, "s3cret", endless);
    assert!(!ok && out.contains("query ran longer than 2s"), "{out}");
    let err = client.query_one(endless, &[]).unwrap_err();
    let db = err.as_db_error().unwrap_or_else(|| panic!("{err:?}"));
    assert_eq!((db.code(), db.message()), (&SqlState::QUERY_CANCELED, "query ran longer than 2s"), "{db:?}");
    assert!(started.elapsed() < Duration::from_secs(20), "{:?}", started.elapsed());

    assert!(!run.logs().contains("panicked"), "{}", run.logs());
    run.signal("TERM");
    assert!(run.wait(Duration::from_secs(30)).success(), "{}", run.logs());
}
