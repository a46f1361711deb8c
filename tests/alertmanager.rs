//! The `alertmanager` receiver against real Prometheus Alertmanagers (built from their Go module by
//! scripts/go-tools.sh, run by scripts/alertmanager.sh, with basic auth on their API) routing to
//! real webhook endpoints: the alert arrives with its labels and annotations, both Alertmanagers of
//! a pair get it while a third URL is down, Alertmanager groups and routes it by the shipped
//! alerts/alertmanager.yml, an Alertmanager silence suppresses it, a killed and restarted
//! Alertmanager gets it back from bearwatch's re-sends, and it resolves.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::servers::{ALERTMANAGER_PASSWORD, ALERTMANAGER_USER, Alertmanager, WebhookServer, free_port};
use common::{Pipeline, brokers, query, unique};

const RULES: &str = r#"
[[rules]]
name = "market-negative"
severity = "critical"
group = "all"
metric = "n_negative"
labels = { team = "markets" }
[rules.condition]
kind = "threshold"
op = ">="
value = 2
min_count = 2

[[routes]]
receivers = ["am"]
"#;

/// Three bad stories in one hour: the rule fires on the second, as the watermark passes it.
const BAD: &str = r#"{"id":"b1","published_at":"1987-03-02T10:05:00Z","headline":"Stocks crash as major bank collapses"}
{"id":"b2","published_at":"1987-03-02T10:20:00Z","headline":"Company warns of huge losses and layoffs"}
{"id":"b3","published_at":"1987-03-02T10:40:00Z","headline":"Shares plunge after fraud charges"}
"#;

/// Five hours later: the bad hour closes and the alert resolves.
const LATER: &str = r#"{"id":"g1","published_at":"1987-03-02T15:10:00Z","headline":"Company reports record profit and raises dividend"}
{"id":"g2","published_at":"1987-03-02T15:30:00Z","headline":"Exports surge to all-time high"}
"#;

/// The shipped route file, with its webhooks pointed at `hook` and Alertmanager's waits shortened.
fn alertmanager_config(hook: &WebhookServer) -> String {
    let shipped = std::fs::read_to_string(format!("{}/alerts/alertmanager.yml", common::ROOT)).unwrap();
    let config = shipped
        .replace("http://127.0.0.1:5001/", &format!("http://127.0.0.1:{}/", hook.port))
        .replace("group_wait: 30s", "group_wait: 1s")
        .replace("group_interval: 5m", "group_interval: 1s");
    assert_ne!(config, shipped);
    config
}

fn pipeline(topic: &str, urls: &[String], http: u16) -> String {
    format!(
        r#"
[source]
type = "kafka"
brokers = "{brokers}"
topics = ["{topic}"]
group_id = "{topic}"

[window]
size = "1h"
allowed_lateness = "0s"

[storage]
path = "store"
checkpoint_interval = "200ms"

[run]
summary_interval = "0s"

[server]
http = "127.0.0.1:{http}"

[alerts]
rules = ["rules.toml"]
evaluate_every = "1m"

[[receivers]]
name = "am"
type = "alertmanager"
urls = {urls:?}
username = "{ALERTMANAGER_USER}"
password = "{ALERTMANAGER_PASSWORD}"
resend_every = "2s"
timeout = "2s"
"#,
        brokers = brokers()
    )
}

fn produce(dir: &Path, topic: &str, name: &str, lines: &str) {
    let file = dir.join(name);
    std::fs::write(&file, lines).unwrap();
    common::produce_to(brokers(), topic, &file);
}

/// Polls `check` until it gives a value, for up to `limit`.
fn wait_for<T>(limit: Duration, what: &str, logs: impl Fn() -> String, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}\n{}", logs());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The webhook notifications Alertmanager sent to `path` with `status` (firing | resolved).
fn notifications(hook: &WebhookServer, path: &str, status: &str) -> Vec<serde_json::Value> {
    let requests = hook.requests.lock().unwrap();
    requests.iter().filter(|(head, body)| head.starts_with(&format!("POST {path} ")) && body["status"] == status).map(|(_, b)| b.clone()).collect()
}

#[test]
fn alertmanager_groups_routes_silences_and_resolves_bearwatch_alerts_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("rules.toml"), RULES).unwrap();
    let (hook, hook2) = (WebhookServer::start(), WebhookServer::start());
    let mut am = Alertmanager::start(&alertmanager_config(&hook), &dir.path().join("am1"));
    let am2 = Alertmanager::start(&alertmanager_config(&hook2), &dir.path().join("am2"));
    assert_eq!(am.status_without_credentials("/api/v2/alerts"), 401, "Alertmanager's API needs the credentials");
    let down = format!("http://127.0.0.1:{}", free_port());
    let topic = unique("am-news");
    common::create_topic_on(brokers(), &topic, 1);
    let http = free_port();
    let mut run = Pipeline::start(dir.path(), "p", &pipeline(&topic, &[am.url(), am2.url(), down], http));
    let am_log = dir.path().join("am1/stderr");
    let logs = || format!("{}\n--- alertmanager\n{}", run.logs(), std::fs::read_to_string(&am_log).unwrap_or_default());

    // Firing: Alertmanager routes the critical alert to the pager webhook, grouped by name and topic.
    produce(dir.path(), &topic, "bad.jsonl", BAD);
    let paged = wait_for(Duration::from_secs(120), "the pager notification", logs, || notifications(&hook, "/pager", "firing").pop());
    assert_eq!(paged["receiver"], "pager");
    assert_eq!(paged["groupLabels"], serde_json::json!({"alertname": "market-negative", "topic": "all"}));
    let alert = &paged["alerts"][0];
    assert_eq!(
        alert["labels"],
        serde_json::json!({"alertname": "market-negative", "severity": "critical", "team": "markets", "topic": "all"})
    );
    let annotations = &alert["annotations"];
    assert!(annotations["summary"].as_str().unwrap().contains("all news: negative stories"), "{annotations}");
    let description = annotations["description"].as_str().unwrap();
    assert!(description.contains("value 2.000 (threshold 2.000"), "{description}");
    assert!(description.contains("Company warns of huge losses and layoffs"), "the headlines behind it: {description}");
    assert!(description.contains("why: "), "and their words: {description}");
    let alert_id = annotations["alert_id"].as_str().unwrap();
    assert_eq!(annotations["dashboard"], format!("http://127.0.0.1:{http}/?alert={alert_id}"));
    assert_eq!(alert["generatorURL"], format!("http://127.0.0.1:{http}/?rule=market-negative&topic=all"));
    assert_eq!(alert["startsAt"], "1987-03-02T10:20:00Z", "the event time it started");
    let link = ureq::get(annotations["dashboard"].as_str().unwrap()).call().unwrap().body_mut().read_to_string().unwrap();
    assert!(link.contains("<title>bearwatch</title>"), "the dashboard link opens the dashboard");

    // The other Alertmanager of the pair has it too; the URL that is down did not stop either.
    let held = wait_for(Duration::from_secs(30), "the alert in the second Alertmanager", logs, || am2.alerts().into_iter().next());
    assert_eq!(held["labels"]["alertname"], "market-negative");
    assert_eq!(held["status"]["state"], "active");
    wait_for(Duration::from_secs(30), "the second Alertmanager's page", logs, || notifications(&hook2, "/pager", "firing").pop());

    // Re-sent while firing: Alertmanager sees it updated, and a restarted one (which keeps no
    // alerts) gets it back.
    let updated = |am: &Alertmanager| am.alerts().first().map(|a| a["updatedAt"].as_str().unwrap().to_string());
    let first = updated(&am).unwrap();
    wait_for(Duration::from_secs(60), "a re-send", logs, || updated(&am).filter(|u| *u != first));
    am.kill();
    am.restart();
    let back = wait_for(Duration::from_secs(60), "the alert after the restart", logs, || am.alerts().into_iter().next());
    assert_eq!(back["labels"]["alertname"], "market-negative");
    assert_eq!(back["annotations"]["alert_id"], alert_id);

    // An Alertmanager silence suppresses it there.
    let now = chrono::Utc::now();
    let silence = serde_json::json!({
        "matchers": [{"name": "alertname", "value": "market-negative", "isRegex": false, "isEqual": true}],
        "startsAt": now.to_rfc3339(),
        "endsAt": (now + chrono::Duration::hours(1)).to_rfc3339(),
        "createdBy": "test",
        "comment": "known event",
    });
    let (status, created) = am.post("/api/v2/silences", &silence);
    assert_eq!(status, 200, "{created}");
    let silence_id = created["silenceID"].as_str().unwrap().to_string();
    let suppressed = wait_for(Duration::from_secs(30), "the silence to take", logs, || {
        am.alerts().into_iter().find(|a| a["status"]["state"] == "suppressed")
    });
    assert_eq!(suppressed["status"]["silencedBy"], serde_json::json!([silence_id]));
    assert_eq!(am.delete(&format!("/api/v2/silence/{silence_id}")), 200);
    wait_for(Duration::from_secs(30), "the silence to expire", logs, || am.alerts().into_iter().find(|a| a["status"]["state"] == "active"));

    // Resolving: bearwatch posts endsAt, and Alertmanager sends the resolved notice on both sides.
    produce(dir.path(), &topic, "later.jsonl", LATER);
    let resolved = wait_for(Duration::from_secs(120), "the resolved notification", logs, || notifications(&hook, "/pager", "resolved").pop());
    assert_eq!(resolved["alerts"][0]["labels"]["alertname"], "market-negative");
    assert_eq!(resolved["alerts"][0]["endsAt"], "1987-03-02T15:30:00Z", "the event time it resolved (the watermark then)");
    wait_for(Duration::from_secs(60), "the resolved notification from the second", logs, || notifications(&hook2, "/pager", "resolved").pop());
    assert!(notifications(&hook, "/desk", "firing").is_empty(), "critical alerts go to the pager route only");

    run.signal("TERM");
    assert!(run.wait(Duration::from_secs(60)).success(), "{}", run.logs());
    let sent = query(&run.storage, "SELECT state, count(*) > 1 FROM notifications WHERE receiver = 'am' AND status = 'sent' GROUP BY state ORDER BY state");
    assert_eq!(sent, [["firing", "true"], ["resolved", "false"]], "re-sent while firing, resolved once");
}

#[test]
fn a_bearer_token_goes_with_every_post() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("rules.toml"), RULES).unwrap();
    std::fs::write(dir.path().join("in.jsonl"), format!("{BAD}{LATER}")).unwrap();
    let endpoint = WebhookServer::start();
    let config = pipeline("unused", &[format!("http://127.0.0.1:{}/prefix/", endpoint.port)], free_port())
        .replace("type = \"kafka\"", "type = \"file\"\npath = \"in.jsonl\"")
        .replace(&format!("username = \"{ALERTMANAGER_USER}\"\npassword = \"{ALERTMANAGER_PASSWORD}\""), "bearer_token = \"${AM_TOKEN}\"");
    let config: String = config.lines().filter(|l| !l.starts_with("topics") && !l.starts_with("group_id") && !l.starts_with("brokers")).map(|l| format!("{l}\n")).collect();
    std::fs::write(dir.path().join("p.toml"), &config).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_bearwatch"))
        .args(["run", "--pipeline", "p.toml"])
        .current_dir(dir.path())
        .env("AM_TOKEN", "s3cret-token")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let requests = endpoint.requests.lock().unwrap().clone();
    assert!(requests.len() >= 2, "firing and resolved: {requests:?}");
    for (head, body) in &requests {
        assert!(head.starts_with("POST /prefix/api/v2/alerts "), "under the URL's path: {head}");
        assert!(head.lines().any(|l| l.eq_ignore_ascii_case("authorization: Bearer s3cret-token")), "{head}");
        assert_eq!(body[0]["labels"]["alertname"], "market-negative");
    }
    let last = &requests.last().unwrap().1[0];
    assert_eq!(last["endsAt"], "1987-03-02T15:30:00Z", "the last post resolves it");
}
