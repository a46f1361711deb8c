//! What an operator sees: the live dashboard in a real browser (Debian's chromium, driven by
//! `playwright-core`, `tests/browser/dashboard.mjs`) and `/metrics`, against a pipeline replaying the
//! demo's Reuters stories with the default alert rules plus a webhook receiver. The screenshot is
//! kept as `target/test-artifacts/dashboard.png`.

mod common;

use std::net::TcpListener;
use std::process::Command;
use std::time::{Duration, Instant};

use bearwatch::telemetry::{Kind, METRICS};
use common::{DEMO_DATA, Pipeline, ROOT};

#[test]
fn the_dashboard_draws_the_windows_shows_an_alert_and_updates_live_and_every_stage_has_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let hook = webhook();
    // The demo's stories plus one that is not JSON, for the dead-letter metrics.
    let input = std::fs::read_to_string(DEMO_DATA).unwrap() + "{not json\n";
    std::fs::write(dir.path().join("in.jsonl"), input).unwrap();
    std::fs::write(dir.path().join("routes.toml"), "[[routes]]\nreceivers = [\"hook\", \"closed\"]\ngroup_wait = \"0s\"\n").unwrap();
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = format!(
        "[source]\ntype = \"file\"\npath = \"in.jsonl\"\nspeed = 40000\n\
         [window]\nsize = \"4h\"\nslide = \"1h\"\nallowed_lateness = \"1h\"\n\
         [storage]\npath = \"store\"\ncheckpoint_interval = \"2s\"\n\
         [run]\nsummary_interval = \"0s\"\nkeep_serving = true\nshutdown_timeout = \"2s\"\n\
         [server]\nhttp = \"127.0.0.1:{port}\"\n\
         [alerts]\nrules = [\"{ROOT}/alerts/default.toml\", \"routes.toml\"]\n\
         [[receivers]]\nname = \"log\"\ntype = \"log\"\n\
         [[receivers]]\nname = \"hook\"\ntype = \"webhook\"\nurl = \"http://127.0.0.1:{hook}/\"\n\
         [[receivers]]\nname = \"closed\"\ntype = \"webhook\"\nurl = \"http://127.0.0.1:9/hooks/SECRET-PATH-TOKEN\"\ntimeout = \"1s\"\n"
    );
    let mut run = Pipeline::start(dir.path(), "demo", &config);
    let agent = wait_ready(&run, port);

    let artifacts = std::path::Path::new(ROOT).join("target/test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let screenshot = artifacts.join("dashboard.png");
    let _ = std::fs::remove_file(&screenshot);
    let result = browse(&run, "dashboard.mjs", port, screenshot.to_str().unwrap());
    assert!(result["later"].as_u64() > result["first"].as_u64(), "the page did not update: {result}");
    assert!(result["series"].as_u64().unwrap() >= 2, "the chart has the `all` line and topic lines: {result}");
    assert!(result["points"].as_u64().unwrap() >= 2, "a line has several windows: {result}");
    let alert = result["alert"].as_str().unwrap();
    assert!(alert.contains("value") && alert.contains("stories"), "the alert says why it fired: {alert}");
    let marked = result["marked"].as_array().unwrap();
    assert!(!marked.is_empty() && marked.iter().all(|w| alert.contains(w.as_str().unwrap())), "the words behind its headlines are marked: {result}");
    assert!(result["headlines"].as_u64().unwrap() >= 10, "{result}");
    assert!(std::fs::metadata(&screenshot).unwrap().len() > 10_000, "screenshot kept");
    assert!(std::fs::metadata(artifacts.join("dashboard-narrow.png")).unwrap().len() > 10_000, "narrow screenshot kept");

    // A window's stories count as its windows do: the corrected one shows the analyst's label.
    let listed = result["correctedInWindow"].as_str().unwrap();
    assert!(listed.contains(&format!("{} (analyst)", result["correction"]["label"].as_str().unwrap())), "{result}");
    // Drill-down: an alert's window lists its stories, most negative first, its words marked.
    let window = &result["alertWindow"];
    assert!(window["stories"].as_u64().unwrap() >= 1 && window["descending"] == true, "{result}");
    assert!(window["marked"].as_u64().unwrap() >= 1, "the alert's words are marked in its window: {result}");
    assert!(window["url"].as_str().unwrap().contains("alert="), "{result}");
    assert_eq!(result["csv"]["name"], "bearwatch-stories.csv");
    assert_eq!(result["csv"]["header"], "id,published_at,topic,sentiment,model_sentiment,p_negative,p_neutral,p_positive,headline");
    assert_eq!(result["csv"]["rows"], window["stories"], "the CSV holds what is shown");
    // A point: how many stories the window stands on, and its stories.
    let point = &result["pointWindow"];
    assert!(point["title"].as_str().unwrap().contains(" stories in the window"), "{result}");
    assert!(point["descending"] == true && point["url"].as_str().unwrap().contains("window="), "{result}");
    // Keyboard: the chart is reached by Tab with a visible focus ring; arrows and Enter work.
    let keyboard = &result["keyboard"];
    assert_eq!(keyboard["focused"]["id"], "chart", "{result}");
    assert_ne!(keyboard["focused"]["outline"], "none", "focus is visible: {result}");
    assert!(keyboard["readout"].as_str().unwrap().contains("Enter lists its stories"), "{result}");
    assert!(keyboard["title"].as_str().unwrap().contains("stories in the window"), "{result}");
    // Filters in the address, and the address reopens the same view.
    let filtered = &result["filtered"];
    let topic = filtered["topic"].as_str().unwrap();
    let shared = filtered["url"].as_str().unwrap();
    assert!(shared.contains(&format!("topic={topic}")) && shared.contains("from=1987-03-09T00") && shared.contains("to=1987-03-12T00"), "{result}");
    assert!(filtered["first"].as_str().unwrap() >= "1987-03-09 00:00" && filtered["last"].as_str().unwrap() < "1987-03-12 00:00", "{result}");
    // The stories panel stays open only on a window the new view draws. The keyboard's window
    // (near the replay's third window, in February) is outside the new range, so it closed and
    // left the address.
    let panel = &filtered["panel"];
    let (before_topic, before_start) = panel["before"].as_str().unwrap().split_once(',').unwrap();
    let in_view = (before_topic == topic || before_topic == "all") && ("1987-03-09".."1987-03-12").contains(&before_start);
    assert!(!in_view && panel["shown"] == false && panel["window"].is_null(), "{result}");
    let mut lines = vec!["all".to_string(), topic.to_string()];
    lines.sort();
    assert_eq!(filtered["reopened"], serde_json::json!({"topic": topic, "from": "1987-03-09T00:00", "to": "1987-03-12T00:00", "lines": lines}));
    // The chart: a panel per busy topic and the market, the count test's band, the alert spans
    // shaded, thin windows marked as thin; at 1400 and 390 px, kept as chart-1400.png and chart-390.png.
    for (width, facts) in [("wide", &result["chart"]["wide"]), ("narrow", &result["chart"]["narrow"])] {
        let panels: Vec<&str> = facts["panels"].as_array().unwrap().iter().map(|p| p.as_str().unwrap()).collect();
        assert!(panels.len() >= 3 && panels.last() == Some(&"all"), "{width}: {facts}");
        assert!(facts["bands"].as_u64().unwrap() >= 1 && facts["thresholds"].as_u64().unwrap() >= 1, "{width}: {facts}");
        let spans = facts["spans"].as_array().unwrap();
        assert!(spans.iter().any(|s| s.as_str().unwrap().starts_with("topic-negative-burst firing from")), "{width}: {facts}");
        assert!(facts["thin"].as_array().unwrap().iter().all(|t| t.as_str().unwrap().contains("a thin window")), "{width}: {facts}");
        assert!(facts["titles"].as_array().unwrap().iter().any(|t| t.as_str().unwrap().contains("alert from")), "{width}: {facts}");
        assert!(facts["scroll"].as_u64() <= Some(if width == "wide" { 1400 } else { 390 }), "{width}: {facts}");
    }
    for shot in ["chart-1400.png", "chart-390.png"] {
        assert!(std::fs::metadata(artifacts.join(shot)).unwrap().len() > 5_000, "{shot} kept");
    }
    // What the chart's band is drawn from, asked directly: the rule's count test per window.
    let band = |query: &str| agent.get(format!("http://127.0.0.1:{port}/api/bands?{query}")).call();
    let mut answer = band("topic=earnings").unwrap();
    let bands: serde_json::Value = serde_json::from_str(&answer.body_mut().read_to_string().unwrap()).unwrap();
    assert_eq!((bands["rule"].as_str(), bands["test"].as_str(), bands["metric"].as_str()), (Some("topic-negative-burst"), Some("count test"), Some("n_negative")), "{bands}");
    let windows = bands["windows"].as_array().unwrap();
    assert!(windows.len() > 50 && windows.iter().all(|w| w["usual"].as_f64() <= w["threshold"].as_f64()), "{bands}");
    let ranged = band("topic=earnings&from=1987-03-09T00:00:00Z&to=1987-03-10T00:00:00Z").unwrap().body_mut().read_to_string().unwrap();
    let ranged: serde_json::Value = serde_json::from_str(&ranged).unwrap();
    let day = ranged["windows"].as_array().unwrap();
    assert!((12..=24).contains(&day.len()), "a band per hourly window of the day that has stories: {ranged}");
    assert!(day.iter().all(|w| w["window_start"].as_str().unwrap().starts_with("1987-03-09T")), "{ranged}");
    for bad in ["topic=earnings&from=yesterday", "topic=", "topic=earnings&limit=5"] {
        assert_eq!(band(bad).unwrap().status().as_u16(), 400, "{bad}");
    }

    // 360 to 1920 px: nothing wider than the screen (and no console errors, checked above).
    for width in result["widths"].as_array().unwrap() {
        assert!(width["scroll"].as_u64() <= width["width"].as_u64(), "wider than the screen: {result}");
    }

    // The feedback given in the page is in the tables, as the open API's `anonymous` user.
    let correction = &result["correction"];
    let story = correction["story"].as_str().unwrap();
    assert_eq!(correction["shown"].as_str().unwrap(), format!("recorded for {story}: sentiment → {}", correction["label"].as_str().unwrap()), "{result}");
    assert_eq!(result["verdict"]["shown"].as_str().unwrap(), format!("recorded for alert {}: noise", result["verdict"]["alert"].as_str().unwrap()));
    assert!(result["missed"].as_str().unwrap().starts_with("recorded"), "{result}");
    let sql = |query: &str| -> Vec<serde_json::Value> {
        let mut response = agent.post(format!("http://127.0.0.1:{port}/sql")).send(query).unwrap();
        serde_json::from_str(&response.body_mut().read_to_string().unwrap()).unwrap()
    };
    let labels = sql("SELECT story_id, model_label, analyst_label, action, analyst, source FROM label_feedback WHERE action = 'correct'");
    let expected = serde_json::json!([{"story_id": correction["story"], "model_label": correction["given"], "analyst_label": correction["label"],
        "action": "correct", "analyst": "anonymous", "source": "dashboard"}]);
    assert_eq!(serde_json::Value::Array(labels), expected);
    // The review queue's story, confirmed there: both heads, as the model read them; and it said why.
    let review = &result["review"];
    assert!(review["why"].as_str().unwrap().starts_with("the model is unsure of its"), "{result}");
    assert!(review["listed"].as_u64().unwrap() >= 10, "{result}");
    let confirmed = sql(&format!(
        "SELECT head, action, source FROM label_feedback WHERE story_id = '{}' ORDER BY head",
        review["story"].as_str().unwrap()
    ));
    assert_eq!(
        confirmed,
        vec![
            serde_json::json!({"head": "sentiment", "action": "confirm", "source": "dashboard"}),
            serde_json::json!({"head": "topic", "action": "confirm", "source": "dashboard"})
        ]
    );
    assert_eq!(sql("SELECT alert_id, verdict FROM alert_verdicts"), vec![serde_json::json!({"alert_id": result["verdict"]["alert"], "verdict": "noise"})]);
    assert_eq!(sql("SELECT topic, note FROM missed_events"), vec![serde_json::json!({"topic": "energy", "note": "OPEC meeting"})]);
    // The correction acts on the windows at once: the story counts with the analyst's label.
    let deadline = Instant::now() + Duration::from_secs(60);
    let of_correction = format!("SELECT story_id, label, matched FROM applied_labels WHERE matched = 'story' AND story_id = '{story}'");
    while sql(&of_correction).is_empty() {
        assert!(Instant::now() < deadline, "the dashboard's correction was not applied\n{}", run.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    let applied = sql(&of_correction);
    assert_eq!(applied, vec![serde_json::json!({"story_id": correction["story"], "label": correction["label"], "matched": "story"})]);

    // The input has ended (keep_serving holds the server up): every stage has counted.
    let text = loop {
        let mut response = agent.get(format!("http://127.0.0.1:{port}/metrics")).call().unwrap();
        let text = response.body_mut().read_to_string().unwrap();
        if std::fs::read_to_string(&run.stderr).unwrap_or_default().contains("still serving") && text.contains("outcome=\"sent\"") {
            break text;
        }
        assert!(Instant::now() < deadline + Duration::from_secs(240), "the replay never finished\n{}", run.logs());
        std::thread::sleep(Duration::from_millis(200));
    };
    // Lag is a Kafka source's (tests/kafka.rs checks it); object storage is tests/object_storage.rs's.
    let elsewhere = ["bearwatch_kafka_consumer_lag", "bearwatch_object_store_requests_total", "bearwatch_object_store_errors_total", "bearwatch_object_store_request_seconds"];
    common::check_with_prometheus_tools(&text, &elsewhere);
    for (name, kind, _, _) in METRICS {
        if elsewhere.contains(name) {
            continue;
        }
        assert!(text.contains(&format!("# HELP {name} ")), "{name} has no help text:\n{text}");
        let sample = if *kind == Kind::Histogram { format!("{name}_bucket") } else { name.to_string() };
        assert!(text.lines().any(|l| l.starts_with(&sample)), "{name} has no samples:\n{text}");
    }
    let value = |line_start: &str| -> f64 {
        text.lines().find(|l| l.starts_with(line_start)).and_then(|l| l.rsplit(' ').next()?.parse().ok()).unwrap_or(-1.0)
    };
    assert_eq!(value("bearwatch_stage_received_total{stage=\"source\"}"), 3001.0);
    assert_eq!(value("bearwatch_stage_dropped_total{stage=\"source\",reason=\"dead_letter\"}"), 1.0);
    assert_eq!(value("bearwatch_dead_letter_total{kind=\"json\"}"), 1.0);
    assert_eq!(value("bearwatch_stage_sent_total{stage=\"source\"}"), 3000.0, "every demo story is valid and unique");
    // And the two headlines judged in the page (the correction, and the review queue's confirmed
    // story), each read by the model for near-duplicate matching.
    assert_eq!(value("bearwatch_stage_sent_total{stage=\"classify\"}"), 3002.0);
    assert_eq!(value("bearwatch_stage_received_total{stage=\"window\"}"), 3000.0);
    assert!(value("bearwatch_alerts_total{state=\"firing\"}") >= 1.0);

    run.signal("TERM");
    assert!(run.wait(Duration::from_secs(30)).success(), "{}", run.logs());
    // Logs at info: failed deliveries are there, but no receiver URL (its path is a secret) and no
    // story body.
    let logs = std::fs::read_to_string(&run.stderr).unwrap();
    assert!(logs.contains("notification failed"), "{logs}");
    assert!(!logs.contains("SECRET-PATH-TOKEN"), "a receiver URL leaked into the logs");
    assert!(!logs.contains("Showers continued throughout the week"), "a story body leaked into the logs");
}

/// A webhook endpoint that answers 200 to everything; returns its port.
/// Runs `tests/browser/SCRIPT` on the pipeline's dashboard with one more argument; returns the JSON
/// line it prints, which must report no errors in the page.
fn browse(run: &Pipeline, script: &str, port: u16, arg: &str) -> serde_json::Value {
    let out = Command::new("node")
        .arg(std::path::Path::new(ROOT).join("tests/browser").join(script))
        .arg(format!("http://127.0.0.1:{port}/"))
        .arg(arg)
        .output()
        .expect("node is needed (and `npm ci` in tests/browser; scripts/test.sh does both)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "browser run failed: {stdout}\n{}\n{}", String::from_utf8_lossy(&out.stderr), run.logs());
    let result: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap();
    assert_eq!(result["errors"], serde_json::json!([]), "errors in the page: {result}");
    result
}

/// Waits until the pipeline's `/ready` answers 200; returns the agent that asked.
fn wait_ready(run: &Pipeline, port: u16) -> ureq::Agent {
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let deadline = Instant::now() + Duration::from_secs(60);
    while agent.get(format!("http://127.0.0.1:{port}/ready")).call().map(|r| r.status().as_u16()).unwrap_or(0) != 200 {
        assert!(Instant::now() < deadline, "never ready\n{}", run.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    agent
}

fn webhook() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = std::io::BufReader::new(stream);
            let mut length = 0;
            loop {
                let mut line = String::new();
                if std::io::BufRead::read_line(&mut reader, &mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; length];
            let _ = std::io::Read::read_exact(&mut reader, &mut body);
            let _ = std::io::Write::write_all(reader.get_mut(), b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        }
    });
    port
}

/// `/ready` is about the source: with no broker to reach it stays 503 while `/health` is 200.
#[test]
fn ready_waits_for_the_broker_while_health_answers() {
    let dir = tempfile::tempdir().unwrap();
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let nobody = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = format!(
        "[source]\ntype = \"kafka\"\nbrokers = \"127.0.0.1:{nobody}\"\ntopics = [\"news\"]\ngroup_id = \"g\"\n\
         [storage]\npath = \"store\"\n[run]\nsummary_interval = \"0s\"\n[server]\nhttp = \"127.0.0.1:{port}\"\n"
    );
    let mut run = Pipeline::start(dir.path(), "p", &config);
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let status = |path: &str| agent.get(format!("http://127.0.0.1:{port}{path}")).call().map(|r| r.status().as_u16()).unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(60);
    while status("/health") != 200 {
        assert!(Instant::now() < deadline, "no server\n{}", run.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    // Long enough for several reachability checks (every 2 s) to have failed.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(status("/ready"), 503, "{}", run.logs());
    assert_eq!(status("/health"), 200);
    run.signal("TERM");
    assert!(run.wait(Duration::from_secs(30)).success(), "{}", run.logs());
}

/// A per-ticker rule's alert in the browser: titled by its ticker, its window's stories are the
/// stories that name the ticker, and the stories' CSV keeps a formula-like headline as text.
#[test]
fn a_ticker_alert_is_titled_by_its_ticker_and_lists_the_stories_that_name_it() {
    let dir = tempfile::tempdir().unwrap();
    let at = chrono::DateTime::parse_from_rfc3339("2026-01-05T09:00:00Z").unwrap();
    let line = |i: usize, headline: &str, tickers: &str| {
        let published = (at + chrono::Duration::minutes(i as i64)).to_rfc3339();
        format!("{{\"id\":\"t{i}\",\"published_at\":\"{published}\",\"headline\":{},\"tickers\":{tickers}}}\n", serde_json::to_string(headline).unwrap())
    };
    let mut input = String::new();
    for (i, headline) in ["=HYPERLINK(\"http://x\") Acme shares plunge after fraud probe", "Acme posts record loss, cuts outlook", "Acme shares slump as regulator sues"].iter().enumerate() {
        input += &line(i, headline, "[\"ACME\"]");
    }
    input += &line(3, "Globex raises dividend", "[\"GLBX\"]");
    // A later story moves the watermark past the window, so that it closes.
    input += &line(600, "Initech opens a new plant", "[]");
    std::fs::write(dir.path().join("in.jsonl"), input).unwrap();
    std::fs::write(
        dir.path().join("ticker-rules.toml"),
        "[[rules]]\nname = \"ticker-losses\"\nseverity = \"warning\"\ngroup = \"ticker\"\nmetric = \"n_negative\"\n\
         [rules.condition]\nkind = \"threshold\"\nop = \">=\"\nvalue = 2\nmin_count = 2\n[[routes]]\nreceivers = [\"log\"]\n",
    )
    .unwrap();
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = format!(
        "[source]\ntype = \"file\"\npath = \"in.jsonl\"\n\
         [window]\nsize = \"1h\"\nslide = \"1h\"\ngroup_by = [\"topic\", \"ticker\"]\n\
         [storage]\npath = \"store\"\ncheckpoint_interval = \"1s\"\n\
         [run]\nsummary_interval = \"0s\"\nkeep_serving = true\nshutdown_timeout = \"2s\"\n\
         [server]\nhttp = \"127.0.0.1:{port}\"\n\
         [alerts]\nrules = [\"ticker-rules.toml\"]\n[[receivers]]\nname = \"log\"\ntype = \"log\"\n"
    );
    let mut run = Pipeline::start(dir.path(), "ticker", &config);
    wait_ready(&run, port);
    let result = browse(&run, "ticker.mjs", port, "ACME");
    let title = result["title"].as_str().unwrap();
    assert!(title.contains("ticker-losses · ACME") && !title.contains("undefined"), "{result}");
    assert!(result["storiesTitle"].as_str().unwrap().contains("ticker ACME"), "{result}");
    assert_eq!((result["stories"].as_u64(), result["linkedStories"].as_u64()), (Some(3), Some(3)), "the three ACME stories: {result}");
    let csv: Vec<&str> = result["csv"].as_array().unwrap().iter().filter_map(|l| l.as_str()).collect();
    assert!(csv.iter().any(|l| l.ends_with("\"'=HYPERLINK(\"\"http://x\"\") Acme shares plunge after fraud probe\"")), "{csv:?}");
    assert!(csv.iter().all(|l| !l.contains(",=")), "{csv:?}");
    run.signal("TERM");
    assert!(run.wait(Duration::from_secs(60)).success(), "{}", run.logs());
}
