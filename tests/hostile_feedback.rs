//! What a page on another site, or one analyst with a flood of feedback, can do to a running
//! pipeline (its own binary, so that its load does not share the cores with tests/adversarial.rs).

mod common;

use std::time::{Duration, Instant};

use common::Pipeline;
use common::servers::free_port;

fn rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok()).unwrap_or(0)
        / 1024
}

/// Writes from another origin, under another host name or without a JSON body are refused; a thousand
/// flips of a headline that thousands of stories share cost one re-count of them, spread over
/// rounds with checkpoints between; CSV answers neutralise formulas.
#[test]
fn hostile_pages_and_feedback_floods_are_refused_or_bounded() {
    const SHARED: usize = 5_000;
    let dir = tempfile::tempdir().unwrap();
    let at = chrono::DateTime::parse_from_rfc3339("2026-01-02T00:00:00Z").unwrap();
    let lines: String = (0..SHARED)
        .map(|i| {
            let published = (at + chrono::Duration::seconds(i as i64)).to_rfc3339();
            format!("{{\"id\":\"dup-{i}\",\"published_at\":\"{published}\",\"headline\":\"=HYPERLINK(\\\"http://x\\\") Acme shares fall\"}}\n")
        })
        .collect();
    std::fs::write(dir.path().join("in.jsonl"), lines).unwrap();
    let http = free_port();
    let config = format!(
        "[source]\ntype = \"file\"\npath = \"in.jsonl\"\n[storage]\npath = \"store\"\ncheckpoint_interval = \"1s\"\n\
         [window]\nsize = \"1d\"\nslide = \"1d\"\n[run]\nsummary_interval = \"0s\"\nkeep_serving = true\nshutdown_timeout = \"2s\"\n\
         [server]\nhttp = \"127.0.0.1:{http}\"\n"
    );
    let mut run = Pipeline::start(dir.path(), "p", &config);
    let api = common::api::Api::new(&format!("http://127.0.0.1:{http}"));
    let deadline = Instant::now() + Duration::from_secs(300);
    while api.raw("POST", "/sql", &[], Some("SELECT count(*) AS n FROM news")).map(|r| r.2).unwrap_or_default() != format!("[{{\"n\":{SHARED}}}]") {
        assert!(Instant::now() < deadline && run.child.try_wait().unwrap().is_none(), "not scored\n{}", run.logs());
        std::thread::sleep(Duration::from_millis(200));
    }
    let count = |sql: &str| api.raw("POST", "/sql", &[], Some(&format!("SELECT count(*) AS n FROM {sql}"))).map(|r| r.2).unwrap_or_default();
    let expect = |n: usize| format!("[{{\"n\":{n}}}]");
    let label = r#"{"story_id": "dup-0", "head": "sentiment", "label": "neutral"}"#;
    let post = |headers: &[(&str, &str)], path: &str, body: &str| api.raw("POST", path, headers, Some(body)).unwrap();
    // A form or a text/plain fetch, which any page may send without asking first, never writes.
    let (status, _, body) = post(&[("Content-Type", "text/plain")], "/api/feedback/labels", label);
    assert_eq!(status, 415, "{body}");
    let (status, _, body) = post(&[("Content-Type", "application/x-www-form-urlencoded")], "/api/models/rollback", "{}");
    assert_eq!(status, 415, "{body}");
    // Another origin, or another host name (DNS rebinding), is refused even with a JSON body.
    let json = ("Content-Type", "application/json");
    let (status, _, body) = post(&[json, ("Origin", "http://evil.example")], "/api/feedback/labels", label);
    assert!(status == 403 && body.contains("allowed_origins"), "{status} {body}");
    let (status, _, body) = post(&[json, ("Origin", "null")], "/api/models/rollback", "{}");
    assert_eq!(status, 403, "{body}");
    // A flood of them is refused and counted one by one, but logged once in a while: each line
    // was a request anyone can send, so the log grew as fast as they came.
    for i in 0..300 {
        let origin = format!("http://evil-{}.example", char::from(b'a' + (i % 26) as u8).to_string().repeat(1 + i / 26));
        assert_eq!(post(&[json, ("Origin", origin.as_str())], "/api/feedback/labels", label).0, 403);
    }
    let logged = std::fs::read_to_string(&run.stderr).unwrap().matches("request refused").count();
    assert!(logged <= 10, "{logged} log lines for 302 refusals");
    let metrics = api.raw("GET", "/metrics", &[], None).unwrap().2;
    assert!(metrics.contains("bearwatch_http_refused_total{reason=\"origin\"} 302"), "every refusal counted");
    for (path, content_type, body) in [("/api/feedback/labels", "application/json", label), ("/sql", "text/plain", "SELECT 1")] {
        let answer = raw_http(http, &format!(
            "POST {path} HTTP/1.1\r\nHost: rebound.evil.example\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ));
        assert!(answer.starts_with("HTTP/1.1 403") && answer.contains("allowed_hosts"), "{answer}");
    }
    assert_eq!(count("label_feedback"), expect(0), "nothing was written");
    // Ids no table holds, as long as the body allows: not found, and not sent back whole.
    let long = "x".repeat(300_000);
    for (path, body) in [
        ("/api/feedback/labels", serde_json::json!({"story_id": long, "head": "sentiment", "label": "neutral"})),
        ("/api/feedback/verdicts", serde_json::json!({"alert_id": long, "verdict": "noise"})),
    ] {
        let (status, _, body) = post(&[("Content-Type", "application/json")], path, &body.to_string());
        assert!(status == 404 && body.len() < 400 && body.contains("300000 characters"), "{path}: {status} {}", &body[..body.len().min(400)]);
    }
    // The page this server serves (same origin) writes.
    let same_origin = format!("http://127.0.0.1:{http}");
    let (status, _, body) = post(&[json, ("Origin", same_origin.as_str())], "/api/feedback/labels", label);
    assert_eq!(status, 201, "{body}");

    // One request flipping the shared headline a thousand times: the last label wins, each story
    // is re-counted once more, and checkpoints go on meanwhile.
    let started = Instant::now();
    let neutral = "applied_labels WHERE label = 'neutral'";
    while count(neutral) != expect(SHARED) {
        assert!(started.elapsed() < Duration::from_secs(120) && run.child.try_wait().unwrap().is_none(), "not applied\n{}", run.logs());
        std::thread::sleep(Duration::from_millis(200));
    }
    let flips: Vec<serde_json::Value> = (0..1000)
        .map(|i| serde_json::json!({"story_id": format!("dup-{}", i % SHARED), "head": "sentiment", "label": if i % 2 == 0 { "positive" } else { "negative" }}))
        .collect();
    let rss_before = rss_mib(run.child.id());
    let started = Instant::now();
    let (status, _, body) = post(&[json], "/api/feedback/labels", &serde_json::to_string(&flips).unwrap());
    assert_eq!(status, 201, "{body}");
    let mut peak = rss_before;
    while count("applied_labels WHERE label = 'negative'") != expect(SHARED) {
        peak = peak.max(rss_mib(run.child.id()));
        assert!(started.elapsed() < Duration::from_secs(120) && run.child.try_wait().unwrap().is_none(), "not applied\n{}", run.logs());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(count("applied_labels"), expect(2 * SHARED), "the neutral label, then the last flip: not 1000 x {SHARED}");
    assert!(peak < rss_before + 512, "RSS {rss_before} MiB -> {peak} MiB during the flips");

    // CSV cells that would run as formulas in a spreadsheet are text.
    let (status, _, csv) = api.raw("POST", "/sql", &[("Accept", "text/csv")], Some("SELECT headline FROM news LIMIT 1")).unwrap();
    assert_eq!(status, 200);
    assert!(csv.lines().nth(1).is_some_and(|l| l.starts_with("\"'=HYPERLINK")), "{csv}");
    run.signal("TERM");
    assert!(run.wait(Duration::from_secs(60)).success(), "{}", run.logs());
    eprintln!("{SHARED} stories re-counted after 1000 flips in {:?}; RSS {rss_before} -> {peak} MiB", started.elapsed());
}

/// One request written by hand (a `Host` of our choosing), the answer's head and body as text.
fn raw_http(http: u16, request: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", http)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer
}
