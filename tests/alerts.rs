//! Alert notifications against real servers on 127.0.0.1: an SMTP server (aiosmtpd, which parses
//! what it receives) and an HTTP server for webhooks. Includes an SMTP outage with a kill -9 in the
//! middle of the retries: the email arrives exactly once after the server returns.

mod common;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::servers::{SmtpServer, WebhookServer, free_port};
use common::{Pipeline, query, query_one};

const RULES: &str = r#"
[[rules]]
name = "market-negative"
severity = "critical"
group = "all"
metric = "n_negative"
[rules.condition]
kind = "threshold"
op = ">="
value = 2
min_count = 2

[[routes]]
receivers = ["mail", "hook"]
"#;

/// Three bad stories in one hour (fires on the second, as the watermark passes it), two good ones
/// five hours later (resolves).
fn stories() -> String {
    [
        ("b1", "1987-03-02T10:05:00Z", "Stocks crash as major bank collapses"),
        ("b2", "1987-03-02T10:20:00Z", "Company warns of huge losses and layoffs"),
        ("b3", "1987-03-02T10:40:00Z", "Shares plunge after fraud charges"),
        ("g1", "1987-03-02T15:10:00Z", "Company reports record profit and raises dividend"),
        ("g2", "1987-03-02T15:30:00Z", "Exports surge to all-time high"),
    ]
    .iter()
    .map(|(id, at, headline)| format!("{{\"id\":\"{id}\",\"published_at\":\"{at}\",\"headline\":\"{headline}\"}}\n"))
    .collect()
}

fn pipeline(smtp_port: u16, webhook_port: u16) -> String {
    format!(
        r#"
[source]
type = "file"
path = "in.jsonl"

[window]
size = "1h"
allowed_lateness = "0s"

[storage]
path = "store"
checkpoint_interval = "200ms"

[run]
summary_interval = "0s"
shutdown_timeout = "60s"

[alerts]
rules = ["rules.toml"]

[[receivers]]
name = "mail"
type = "email"
smtp_host = "127.0.0.1"
smtp_port = {smtp_port}
tls = "none"
from = "bearwatch <bearwatch@example.com>"
to = ["desk@example.com"]
timeout = "2s"

[[receivers]]
name = "hook"
type = "webhook"
url = "http://127.0.0.1:{webhook_port}/alerts"
bearer_token = "hook-t0ken"
timeout = "2s"
"#
    )
}

fn setup(dir: &Path) {
    std::fs::write(dir.join("in.jsonl"), stories()).unwrap();
    std::fs::write(dir.join("rules.toml"), RULES).unwrap();
}

#[test]
fn email_and_webhook_receive_explained_alerts() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path());
    let smtp_port = free_port();
    let smtp = SmtpServer::start(smtp_port, &dir.path().join("mail"));
    let hook = WebhookServer::start();
    let mut run = Pipeline::start(dir.path(), "p", &pipeline(smtp_port, hook.port));
    assert!(run.wait(Duration::from_secs(90)).success(), "{}", run.logs());

    let mails = smtp.messages();
    assert_eq!(mails.len(), 2, "{mails:?}");
    let firing = mails.iter().find(|m| m["subject"].as_str().unwrap().starts_with("[FIRING] market-negative")).unwrap();
    assert_eq!(firing["to"], serde_json::json!(["desk@example.com"]));
    let text = firing["text"].as_str().unwrap();
    assert!(text.contains("all news: negative stories"), "{text}");
    assert!(text.contains("Stocks crash as major bank collapses"), "the headlines behind it: {text}");
    // Each headline comes with the words that make it negative: after it in the text, in bold in the HTML.
    assert!(text.contains("why: "), "{text}");
    let html = firing["html"].as_str().unwrap();
    let cell = html.split("<td>").find(|c| c.replace("<b>", "").replace("</b>", "").starts_with("Company warns of huge losses and layoffs</td>"));
    assert!(cell.is_some_and(|c| c.contains("<b>")), "{html}");
    assert!(mails.iter().any(|m| m["subject"].as_str().unwrap().starts_with("[RESOLVED] market-negative")));

    let requests = hook.requests.lock().unwrap().clone();
    assert_eq!(requests.len(), 2);
    let (head, alert) = requests.iter().find(|(_, a)| a["state"] == "firing").unwrap();
    assert!(head.to_ascii_lowercase().contains(&format!("idempotency-key: {}/firing/hook", alert["alert_id"].as_str().unwrap())));
    // Its credentials go with it (a `bearer_token` on a webhook was accepted and never sent).
    assert!(head.contains("authorization: Bearer hook-t0ken") || head.contains("Authorization: Bearer hook-t0ken"), "{head}");
    assert_eq!(alert["rule"], "market-negative");
    assert_eq!(alert["group"], serde_json::json!({"topic": "all"}));
    // It fires on the second bad story, the moment the rule holds in event time.
    assert_eq!((alert["value"].as_f64(), alert["threshold"].as_f64(), alert["count"].as_u64()), (Some(2.0), Some(2.0), Some(2)));
    assert_eq!(alert["window_start"], "1987-03-02T10:00:00Z");
    assert_eq!(alert["top_headlines"].as_array().unwrap().len(), 2);
    assert!(alert["top_headlines"][0]["p_negative"].as_f64().unwrap() > 0.5);
    for story in alert["top_headlines"].as_array().unwrap() {
        let words: Vec<&str> = story["headline"].as_str().unwrap().split_whitespace().collect();
        let why = story["why"].as_array().unwrap_or_else(|| panic!("no why: {story}"));
        assert!((1..=3).contains(&why.len()), "{story}");
        for w in why {
            let position = w["position"].as_u64().unwrap() as usize;
            assert_eq!(words[position], w["word"], "{story}");
            assert!(w["effect"].as_f64().unwrap() > 0.0, "{story}");
        }
    }

    let storage = &run.storage;
    assert_eq!(query_one(storage, "SELECT count(*) FROM alerts"), "2");
    assert_eq!(query_one(storage, "SELECT count(*) FROM alerts WHERE state = 'firing' AND top_headlines LIKE '%\"why\":[{\"word\":%'"), "1");
    let sent = query(storage, "SELECT receiver, state FROM notifications WHERE status = 'sent' ORDER BY 1, 2");
    assert_eq!(sent, [["hook", "firing"], ["hook", "resolved"], ["mail", "firing"], ["mail", "resolved"]]);
}

#[test]
fn with_smtp_down_the_email_is_retried_and_delivered_exactly_once_even_across_a_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path());
    let smtp_port = free_port();
    let hook = WebhookServer::start();
    hook.status.store(503, Ordering::SeqCst);
    let config = pipeline(smtp_port, hook.port);

    // SMTP is down and the webhook answers 503: both are retried with backoff.
    let mut first = Pipeline::start(dir.path(), "first", &config);
    let outbox = dir.path().join("store/outbox.jsonl");
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::read_to_string(&outbox).unwrap_or_default().matches("\"event\":\"failed\"").count() < 4 {
        assert!(Instant::now() < deadline, "no failed attempts recorded\n{}", first.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    // The webhook's error says what its body said.
    let text = std::fs::read_to_string(&outbox).unwrap();
    assert!(text.lines().any(|l| l.contains("\"event\":\"failed\"") && l.contains("HTTP 503 Service Unavailable: no_service")), "{text}");
    first.signal("KILL");
    first.wait(Duration::from_secs(10));

    // Both come back; a restart finds the pending notifications in the outbox and delivers them.
    let smtp = SmtpServer::start(smtp_port, &dir.path().join("mail"));
    hook.status.store(200, Ordering::SeqCst);
    let mut second = Pipeline::start(dir.path(), "second", &config);
    assert!(second.wait(Duration::from_secs(90)).success(), "{}", second.logs());
    assert!(std::fs::read_to_string(&second.stderr).unwrap().contains("notifications pending from an earlier run"));
    let subjects = |s: &SmtpServer| -> Vec<String> {
        let mut v: Vec<String> = s.messages().iter().map(|m| m["subject"].as_str().unwrap()[..9].to_string()).collect();
        v.sort();
        v
    };
    assert_eq!(subjects(&smtp), ["[FIRING] ", "[RESOLVED"]);
    assert_eq!(hook.requests.lock().unwrap().len(), 2);
    let attempts: u64 = query_one(&second.storage, "SELECT max(attempts) FROM notifications WHERE receiver = 'mail' AND status = 'sent'").parse().unwrap();
    assert!(attempts >= 2, "delivered after failed attempts, not on the first: {attempts}");

    // Another restart repeats nothing.
    let mut third = Pipeline::start(dir.path(), "third", &config);
    assert!(third.wait(Duration::from_secs(60)).success(), "{}", third.logs());
    assert_eq!(subjects(&smtp), ["[FIRING] ", "[RESOLVED"]);
    assert_eq!(hook.requests.lock().unwrap().len(), 2);
}

/// A webhook that answers a redirect (an http:// URL its server moves to https://, say): the notice
/// fails with the place it points to, and nothing follows it with a bodiless GET that a page would
/// answer 200, which counted as delivered and lost the alert.
#[test]
fn a_webhook_that_redirects_fails_with_where_it_points_and_is_not_followed() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path());
    std::fs::write(dir.path().join("rules.toml"), RULES.replace("receivers = [\"mail\", \"hook\"]", "receivers = [\"hook\"]")).unwrap();
    let hook = WebhookServer::start();
    hook.status.store(301, Ordering::SeqCst);
    let mut run = Pipeline::start(dir.path(), "p", &pipeline(free_port(), hook.port));
    let outbox = dir.path().join("store/outbox.jsonl");
    let deadline = Instant::now() + Duration::from_secs(60);
    let failed = loop {
        let text = std::fs::read_to_string(&outbox).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains("\"event\":\"failed\"")) {
            break line.to_string();
        }
        assert!(!text.contains("\"event\":\"sent\""), "a redirected notice counted as sent:\n{text}");
        assert!(Instant::now() < deadline, "no failed attempt recorded\n{}", run.logs());
        std::thread::sleep(Duration::from_millis(100));
    };
    let moved = format!("HTTP 301 Moved Permanently: redirected to http://127.0.0.1:{}/moved", hook.port);
    assert!(failed.contains(&moved), "{failed}");
    assert_eq!(hook.others.lock().unwrap().len(), 0, "no GET to where it points");
    // Once the webhook takes it, the same notice goes.
    hook.status.store(200, Ordering::SeqCst);
    assert!(run.wait(Duration::from_secs(90)).success(), "{}", run.logs());
    assert_eq!(hook.requests.lock().unwrap().len(), 2, "firing and resolved, once each");
}

#[test]
fn the_kafka_receiver_publishes_alerts_to_a_topic() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path());
    let topic = common::unique("alerts");
    let rules = RULES.replace("receivers = [\"mail\", \"hook\"]", "receivers = [\"bus\"]");
    std::fs::write(dir.path().join("rules.toml"), rules).unwrap();
    let config = pipeline(free_port(), free_port()).replace(
        "[[receivers]]\nname = \"hook\"",
        &format!("[[receivers]]\nname = \"bus\"\ntype = \"kafka\"\ntopic = \"{topic}\"\nbrokers = \"{}\"\n\n[[receivers]]\nname = \"hook\"", common::brokers()),
    );
    let mut run = Pipeline::start(dir.path(), "p", &config);
    assert!(run.wait(Duration::from_secs(90)).success(), "{}", run.logs());

    assert_eq!(alert_states(&topic, Duration::from_secs(30)), ["firing", "resolved"]);
}

/// A headline is the feed's text: printed by the `log` receiver, an escape sequence in it reached
/// the terminal as it was (retitle it here; recolour, hide or rewrite lines elsewhere), and a line
/// break in it printed a forged line of its own.
#[test]
fn a_headline_cannot_write_escape_sequences_or_lines_of_its_own_to_the_terminal() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path());
    let forged = r"Company warns of huge losses\u001b]0;owned\u0007\n[FIRING] forged-rule (critical) all clear";
    let input = stories().replace("Company warns of huge losses and layoffs", forged);
    std::fs::write(dir.path().join("in.jsonl"), input).unwrap();
    std::fs::write(dir.path().join("rules.toml"), RULES.replace("receivers = [\"mail\", \"hook\"]", "receivers = [\"log\"]")).unwrap();
    let config = pipeline(free_port(), free_port()) + "\n[[receivers]]\nname = \"log\"\ntype = \"log\"\n";
    let mut run = Pipeline::start(dir.path(), "p", &config);
    assert!(run.wait(Duration::from_secs(90)).success(), "{}", run.logs());
    let stdout = std::fs::read_to_string(&run.stdout).unwrap();
    assert!(stdout.contains("huge losses\\u001b]0;owned\\u0007 [FIRING] forged-rule"), "the headline, escaped, on its line:\n{stdout}");
    assert!(!stdout.contains('\u{1b}') && !stdout.contains('\u{7}'), "a control character reached stdout:\n{stdout:?}");
    assert!(!stdout.lines().any(|l| l.starts_with("[FIRING] forged-rule")), "a forged line:\n{stdout}");
    // The stored headline is the one the feed sent.
    assert_eq!(query_one(&run.storage, "SELECT count(*) FROM news WHERE strpos(headline, chr(27)) > 0 AND strpos(headline, chr(10)) > 0"), "1");
}

/// The states of the first two alerts on `topic` (each keyed by its alert_id), or of those that
/// came within `limit`.
fn alert_states(topic: &str, limit: Duration) -> Vec<String> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Message;
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", common::brokers())
        .set("group.id", common::unique("reader"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut states = Vec::new();
    let deadline = Instant::now() + limit;
    while states.len() < 2 && Instant::now() < deadline {
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(200)) {
            let alert: serde_json::Value = serde_json::from_slice(message.payload().unwrap()).unwrap();
            assert_eq!(message.key(), alert["alert_id"].as_str().map(str::as_bytes), "keyed by alert_id");
            states.push(alert["state"].as_str().unwrap().to_string());
        }
    }
    states
}

/// On a cluster that wants a login (SASL here), a kafka receiver that names no brokers sends with
/// the source's brokers and its `[source.properties]`: it connected without them, so every alert
/// to the topic was refused and retried until it expired.
#[test]
fn a_kafka_receiver_on_a_secured_cluster_logs_in_as_the_source_does() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path());
    let (news, alerts_topic) = (common::unique("secured-news"), common::unique("secured-alerts"));
    common::create_topic_on(common::brokers(), &news, 1);
    common::produce_to(common::brokers(), &news, &dir.path().join("in.jsonl"));
    std::fs::write(dir.path().join("rules.toml"), RULES.replace("receivers = [\"mail\", \"hook\"]", "receivers = [\"bus\"]")).unwrap();
    let (sasl, login) = common::sasl_brokers();
    let config = format!(
        "[source]\ntype = \"kafka\"\nbrokers = \"{sasl}\"\ntopics = [\"{news}\"]\ngroup_id = \"{group}\"\ndead_letter_topic = \"{news}.dlq\"\n\
         [source.properties]\n\"session.timeout.ms\" = \"6000\"\n{login}\
         [window]\nsize = \"1h\"\nallowed_lateness = \"0s\"\n[storage]\npath = \"store\"\ncheckpoint_interval = \"200ms\"\n\
         [run]\nsummary_interval = \"0s\"\n[alerts]\nrules = [\"rules.toml\"]\n\
         [[receivers]]\nname = \"bus\"\ntype = \"kafka\"\ntopic = \"{alerts_topic}\"\n",
        group = common::unique("group")
    );
    let mut run = Pipeline::start(dir.path(), "p", &config);

    assert_eq!(alert_states(&alerts_topic, Duration::from_secs(90)), ["firing", "resolved"], "{}", run.logs());
    run.signal("TERM");
    assert!(run.wait(Duration::from_secs(30)).success(), "{}", run.logs());
    let sent = query(&run.storage, "SELECT state, attempts FROM notifications WHERE status = 'sent' ORDER BY 1");
    assert_eq!(sent, [["firing", "1"], ["resolved", "1"]], "each at its first attempt");
}

#[test]
fn a_silence_added_over_http_mutes_notifications_and_the_alert_is_still_recorded() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path());
    let hook = WebhookServer::start();
    let http = free_port();
    // Paced at 3,600× so that five hours of 1987 take about five seconds: time to add the silence.
    let config = pipeline(free_port(), hook.port)
        .replace("path = \"in.jsonl\"", "path = \"in.jsonl\"\nspeed = 3600")
        .replace("receivers = [\"mail\", \"hook\"]", "receivers = [\"hook\"]")
        + &format!("\n[server]\nhttp = \"127.0.0.1:{http}\"\nauth_token = \"t0ken-0123456789abcdef\"\n");
    std::fs::write(dir.path().join("rules.toml"), RULES.replace("receivers = [\"mail\", \"hook\"]", "receivers = [\"hook\"]")).unwrap();
    let mut run = Pipeline::start(dir.path(), "p", &config);

    // Every answer is also checked against docs/openapi.json.
    let api = common::api::Api::new(&format!("http://127.0.0.1:{http}"));
    let url = "/api/silences";
    let deadline = Instant::now() + Duration::from_secs(30);
    while api.raw("GET", url, &[("Authorization", "Bearer t0ken-0123456789abcdef")], None).is_err() {
        assert!(Instant::now() < deadline, "the API never came up\n{}", run.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(api.call("GET", url, None, None).0, 401, "no token");
    assert_eq!(api.call("GET", url, Some("wrong"), None).0, 401);

    let now = chrono::Utc::now();
    let silence = |matcher: serde_json::Value, starts: chrono::DateTime<chrono::Utc>, ends: chrono::DateTime<chrono::Utc>| {
        serde_json::json!({"match": matcher, "starts_at": starts, "ends_at": ends, "comment": "test"}).to_string()
    };
    let post = |body: String| api.call("POST", url, Some("t0ken-0123456789abcdef"), Some(&body));
    let hour = chrono::Duration::hours(1);
    let (status, id) = post(silence(serde_json::json!({"rule": "market-negative"}), now - hour, now + hour));
    assert_eq!(status, 201);
    assert!(id["id"].as_str().unwrap().starts_with('s'));
    assert_eq!(post(silence(serde_json::json!({"rule": "x"}), now + hour, now)).0, 400, "ends before it starts");
    assert_eq!(post("{\"match\": 3}".into()).0, 400);
    let many: serde_json::Map<String, serde_json::Value> = (0..33).map(|i| (format!("label{i}"), "x".into())).collect();
    assert_eq!(post(silence(serde_json::Value::Object(many), now, now + hour)).0, 400, "33 matchers");

    let (_, other) = post(silence(serde_json::json!({"topic": "energy"}), now, now + hour));
    let other_url = format!("{url}/{}", other["id"].as_str().unwrap());
    assert_eq!(api.call("DELETE", &other_url, Some("t0ken-0123456789abcdef"), None).0, 204);
    assert_eq!(api.call("DELETE", &other_url, Some("t0ken-0123456789abcdef"), None).0, 404);
    let (_, listed) = api.call("GET", url, Some("t0ken-0123456789abcdef"), None);
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(listed[0]["match"]["rule"], "market-negative");

    assert!(run.wait(Duration::from_secs(60)).success(), "{}", run.logs());
    assert_eq!(query_one(&run.storage, "SELECT count(*) FROM alerts"), "2", "silenced alerts are still recorded");
    assert!(hook.requests.lock().unwrap().is_empty(), "but nobody is notified");
    assert!(std::fs::read_to_string(&run.stderr).unwrap().contains("silenced"));
    // The silence outlives the process.
    assert!(std::fs::read_to_string(dir.path().join("store/silences.json")).unwrap().contains("market-negative"));
}

/// A silence set over the HTTP API while an alert fires stops its reminders at the webhook (each
/// muted one counted), and lifting it lets them go on.
#[test]
fn a_silence_set_while_an_alert_fires_stops_its_reminders_until_it_is_lifted() {
    let dir = tempfile::tempdir().unwrap();
    let hook = WebhookServer::start();
    let http = free_port();
    // The three bad stories fire the alert; the replay then waits for a story ten days on (about
    // four minutes at 3,600×), so the alert keeps firing until the test stops the pipeline.
    let quiet = "{\"id\":\"q1\",\"published_at\":\"1987-03-12T10:00:00Z\",\"headline\":\"Markets are quiet\"}\n";
    let input: String = stories().lines().take(3).map(|line| format!("{line}\n")).collect::<String>() + quiet;
    std::fs::write(dir.path().join("in.jsonl"), input).unwrap();
    std::fs::write(dir.path().join("rules.toml"), RULES.replace("receivers = [\"mail\", \"hook\"]", "receivers = [\"hook\"]\nrepeat_interval = \"1s\"")).unwrap();
    let token = "t0ken-0123456789abcdef";
    let config = pipeline(free_port(), hook.port).replace("path = \"in.jsonl\"", "path = \"in.jsonl\"\nspeed = 3600\nmax_gap = \"30d\"")
        + &format!("\n[server]\nhttp = \"127.0.0.1:{http}\"\nauth_token = \"{token}\"\n");
    let mut run = Pipeline::start(dir.path(), "p", &config);
    let firing = || hook.requests.lock().unwrap().iter().filter(|(_, alert)| alert["state"] == "firing").count();
    let wait = |what: &str, done: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(90);
        while !done() {
            assert!(Instant::now() < deadline, "{what}\n{}", run.logs());
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait("no first notice and reminder", &|| firing() >= 2);

    let api = common::api::Api::new(&format!("http://127.0.0.1:{http}"));
    let now = chrono::Utc::now();
    let silence = serde_json::json!({"match": {"rule": "market-negative"}, "starts_at": now - chrono::Duration::minutes(1), "ends_at": now + chrono::Duration::hours(1), "comment": "known"});
    let (status, created) = api.call("POST", "/api/silences", Some(token), Some(&silence.to_string()));
    assert_eq!(status, 201, "{created}");
    let muted_from = firing();
    let silenced = || common::metric(http, "bearwatch_stage_dropped_total{stage=\"notify\",reason=\"silenced\"}");
    wait("no reminder was silenced", &|| silenced() >= 3);
    assert!(firing() <= muted_from + 1, "reminders reached the webhook under the silence (one may have been on its way)");

    let (status, _) = api.call("DELETE", &format!("/api/silences/{}", created["id"].as_str().unwrap()), Some(token), None);
    assert_eq!(status, 204);
    let lifted_at = firing();
    wait("the reminders did not resume once the silence was lifted", &|| firing() >= lifted_at + 2);
    run.signal("TERM");
    assert!(run.wait(Duration::from_secs(60)).success(), "{}", run.logs());
}

/// A Slack-compatible webhook (`slack = true`) gets the alert as text in which a headline's
/// `<!channel>`, links and `&` are escaped as Slack requires: shown as written, mentioning no one.
#[test]
fn a_slack_webhook_gets_headlines_escaped() {
    let dir = tempfile::tempdir().unwrap();
    let hook = WebhookServer::start();
    let stories = [
        ("s1", "1987-03-02T10:05:00Z", "<!channel> Stocks crash as AT&T bank collapses"),
        ("s2", "1987-03-02T10:20:00Z", "Company warns of huge losses <http://evil.example|click here>"),
        ("s3", "1987-03-02T15:10:00Z", "Company reports record profit and raises dividend"),
    ];
    let input: String = stories.iter().map(|(id, at, h)| format!("{}\n", serde_json::json!({"id": id, "published_at": at, "headline": h}))).collect();
    std::fs::write(dir.path().join("in.jsonl"), input).unwrap();
    std::fs::write(dir.path().join("rules.toml"), RULES.replace("receivers = [\"mail\", \"hook\"]", "receivers = [\"slack\"]")).unwrap();
    let config = format!(
        "[source]\ntype = \"file\"\npath = \"in.jsonl\"\n[window]\nsize = \"1h\"\nallowed_lateness = \"0s\"\n[storage]\npath = \"store\"\n\
         [run]\nsummary_interval = \"0s\"\nshutdown_timeout = \"60s\"\n[alerts]\nrules = [\"rules.toml\"]\n\
         [[receivers]]\nname = \"slack\"\ntype = \"webhook\"\nslack = true\nurl = \"http://127.0.0.1:{}/slack\"\ntimeout = \"2s\"\n",
        hook.port
    );
    let mut run = Pipeline::start(dir.path(), "p", &config);
    assert!(run.wait(Duration::from_secs(90)).success(), "{}", run.logs());
    let requests = hook.requests.lock().unwrap().clone();
    let firing = requests.iter().map(|(_, body)| body["text"].as_str().unwrap_or_default().to_string()).find(|t| t.starts_with("[FIRING]"));
    let text = firing.unwrap_or_else(|| panic!("no firing notice: {requests:?}"));
    assert!(text.contains("&lt;!channel&gt; Stocks crash as AT&amp;T bank collapses"), "{text}");
    assert!(text.contains("&lt;http://evil.example|click here&gt;"), "{text}");
    assert!(!text.contains('<') && !text.contains('>'), "nothing Slack would read as a mention or a link: {text}");
}

/// 40 tickers, each named by three negative headlines within a minute of event time (10:00 to
/// 10:39), a rule that fires per ticker, and a webhook allowed 5 notices an hour. Returns the config;
/// `source` adds lines to its `[source]`.
fn ticker_storm(dir: &std::path::Path, hook: &WebhookServer, source: &str) -> String {
    let tickers = 40;
    let mut input = String::new();
    for t in 0..tickers {
        for (k, headline) in ["shares plunge after fraud charges", "warns of huge losses and layoffs", "collapses as lenders pull credit"].iter().enumerate() {
            let at = format!("1987-03-02T10:{:02}:{:02}Z", t, k * 10);
            input.push_str(&format!("{}\n", serde_json::json!({"id": format!("t{t}-{k}"), "published_at": at, "headline": format!("Z{t:02} Corp {headline}"), "tickers": [format!("Z{t:02}")]})));
        }
    }
    std::fs::write(dir.join("in.jsonl"), input).unwrap();
    let rules = "[[rules]]\nname = \"ticker-negative\"\nseverity = \"warning\"\ngroup = \"ticker\"\nmetric = \"n_negative\"\n\
                 [rules.condition]\nkind = \"threshold\"\nop = \">=\"\nvalue = 2\nmin_count = 2\n\
                 [[routes]]\nreceivers = [\"hook\"]\ngroup_wait = \"0s\"\n";
    std::fs::write(dir.join("rules.toml"), rules).unwrap();
    format!(
        "[source]\ntype = \"file\"\npath = \"in.jsonl\"\n{source}[window]\nsize = \"1h\"\nallowed_lateness = \"0s\"\ngroup_by = [\"topic\", \"ticker\"]\n\
         [storage]\npath = \"store\"\ncheckpoint_interval = \"200ms\"\n[run]\nsummary_interval = \"0s\"\nshutdown_timeout = \"60s\"\n[alerts]\nrules = [\"rules.toml\"]\n\
         [[receivers]]\nname = \"hook\"\ntype = \"webhook\"\nurl = \"http://127.0.0.1:{}/alerts\"\ntimeout = \"2s\"\nrate_limit = 5\nrate_interval = \"1h\"\n",
        hook.port
    )
}

/// What the webhook got from a storm: the alerts it was sent, and the summaries of those held back.
fn storm_requests(hook: &WebhookServer) -> (Vec<serde_json::Value>, Vec<serde_json::Value>) {
    let requests = hook.requests.lock().unwrap().clone();
    let (summaries, alerts): (Vec<_>, Vec<_>) = requests.into_iter().map(|(_, a)| a).partition(|a| a["rule"] == "bearwatch_notifications_held");
    (alerts, summaries)
}

/// A feed that names ever new tickers makes a per-ticker rule fire once per ticker. The webhook gets
/// its `rate_limit` of alerts, and then, at the end of the interval (here: the end of the run), one
/// notification that sums up the rest; every alert is still recorded.
#[test]
fn a_storm_of_ticker_alerts_reaches_a_receiver_as_its_rate_limit_and_one_summary() {
    let dir = tempfile::tempdir().unwrap();
    let hook = WebhookServer::start();
    let config = ticker_storm(dir.path(), &hook, "");
    let mut run = Pipeline::start(dir.path(), "p", &config);
    assert!(run.wait(Duration::from_secs(120)).success(), "{}", run.logs());
    let changes: u64 = query_one(&run.storage, "SELECT count(*) FROM alerts WHERE rule = 'ticker-negative'").parse().unwrap();
    assert!(changes > 20, "most tickers' bursts fire: {changes} changes\n{}", run.logs());
    let (alerts, summaries) = storm_requests(&hook);
    assert_eq!(alerts.len(), 5, "the rate limit: {alerts:?}");
    assert_eq!(summaries.len(), 1, "one summary: {summaries:?}");
    let summary = &summaries[0];
    assert_eq!(summary["count"].as_u64(), Some(changes - 5), "{summary}");
    assert_eq!(summary["group"], serde_json::json!({"receiver": "hook"}));
    let text = summary["summary"].as_str().unwrap();
    assert!(text.starts_with(&format!("{} notifications held back after 5 in 60 min: ticker-negative {}", changes - 5, changes - 5)), "{text}");
    assert!(text.contains("for example ticker-negative Z"), "{text}");
    let metrics = std::fs::read_to_string(&run.stderr).unwrap();
    assert!(metrics.contains("notifications held back after 5"), "the summary is logged too");
    // The summary went through the outbox like any notice.
    let sent = query(&run.storage, "SELECT count(*) FROM notifications WHERE receiver = 'hook' AND status = 'sent'");
    assert_eq!(sent[0][0], "6");
}

/// The rate limit's interval is in the checkpoint: a crash in the middle of a storm neither grants
/// the receiver a second allowance nor loses the count of what was held back.
#[test]
fn a_crash_during_a_storm_keeps_the_rate_limit_and_the_count_of_what_it_held_back() {
    let dir = tempfile::tempdir().unwrap();
    let hook = WebhookServer::start();
    // One minute of event time a second: the storm takes about 40 s to replay.
    let paced = ticker_storm(dir.path(), &hook, "speed = 60\n");
    let mut run = Pipeline::start(dir.path(), "p", &paced);
    let held = |c: &serde_json::Value| c["rate_intervals"]["hook"]["held"]["count"].as_u64().unwrap_or(0);
    run.wait_for_checkpoint(Duration::from_secs(120), "a checkpoint with held-back notices", |c| held(c) >= 3);
    run.signal("KILL");
    run.wait(Duration::from_secs(10));
    let held_at_crash = held(&common::checkpoint(&run.storage).unwrap());
    // The rest as fast as it reads.
    let mut run = Pipeline::start(dir.path(), "p", &paced.replace("speed = 60\n", ""));
    assert!(run.wait(Duration::from_secs(120)).success(), "{}", run.logs());
    let changes: u64 = query_one(&run.storage, "SELECT count(*) FROM alerts WHERE rule = 'ticker-negative'").parse().unwrap();
    let (alerts, summaries) = storm_requests(&hook);
    assert_eq!(alerts.len(), 5, "no second allowance after the restart: {alerts:?}");
    assert_eq!(summaries.len(), 1, "{summaries:?}");
    assert_eq!(summaries[0]["count"].as_u64(), Some(changes - 5), "{} held back before the crash are counted too: {}", held_at_crash, summaries[0]);
}

/// Waits until the webhook has had `rule`'s notification in `state`, and returns it.
fn hooked(hook: &WebhookServer, run: &mut Pipeline, rule: &str, state: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Some((_, alert)) = hook.requests.lock().unwrap().iter().find(|(_, a)| a["rule"] == rule && a["state"] == state) {
            return alert.clone();
        }
        assert!(Instant::now() < deadline && run.child.try_wait().unwrap().is_none(), "no {state} {rule} at the webhook\n{}", run.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Rules change without a restart, as in Prometheus and Alertmanager: SIGHUP (or an admin's
/// `POST /api/rules/reload`) reads the rule files again. A rule gone from them resolves its firing
/// alert, and the receiver is told (before, its alert stayed firing for good, through restarts
/// too); files that do not check leave the rules before in force and say why. SIGHUP used to end
/// the process.
#[test]
fn rule_files_reload_on_sighup_or_request_and_a_rule_gone_resolves_its_alert() {
    let dir = tempfile::tempdir().unwrap();
    let topic = common::unique("reload-news");
    common::create_topic_on(common::brokers(), &topic, 1);
    let hook = WebhookServer::start();
    let http = free_port();
    let token = "t0ken-0123456789abcdef";
    std::fs::write(dir.path().join("rules.toml"), RULES.replace("receivers = [\"mail\", \"hook\"]", "receivers = [\"hook\"]")).unwrap();
    let config = format!(
        "[source]\ntype = \"kafka\"\nbrokers = \"{brokers}\"\ntopics = [\"{topic}\"]\ngroup_id = \"{group}\"\ndead_letter_topic = \"{topic}.dlq\"\n\
         [source.properties]\n\"session.timeout.ms\" = \"6000\"\n\
         [window]\nsize = \"1h\"\nallowed_lateness = \"0s\"\n[storage]\npath = \"store\"\ncheckpoint_interval = \"200ms\"\n\
         [run]\nsummary_interval = \"0s\"\n[alerts]\nrules = [\"rules.toml\"]\n\
         [server]\nhttp = \"127.0.0.1:{http}\"\nauth_token = \"{token}\"\n\
         [[receivers]]\nname = \"hook\"\ntype = \"webhook\"\nurl = \"http://127.0.0.1:{port}/alerts\"\ntimeout = \"2s\"\n",
        brokers = common::brokers(),
        group = common::unique("group"),
        port = hook.port,
    );
    let send = |name: &str, lines: &str| {
        std::fs::write(dir.path().join(name), lines).unwrap();
        common::produce_to(common::brokers(), &topic, &dir.path().join(name));
    };
    let mut run = Pipeline::start(dir.path(), "p", &config);
    send("bad.jsonl", &stories().lines().take(3).map(|l| format!("{l}\n")).collect::<String>());
    let fired = hooked(&hook, &mut run, "market-negative", "firing");

    // The rule is replaced by another: asked over HTTP, the answer says what is in force now.
    let busy = "[[rules]]\nname = \"market-busy\"\nseverity = \"info\"\ngroup = \"all\"\nmetric = \"n\"\n\
                [rules.condition]\nkind = \"threshold\"\nop = \">=\"\nvalue = 1\n\n[[routes]]\nreceivers = [\"hook\"]\n";
    std::fs::write(dir.path().join("rules.toml"), busy).unwrap();
    let api = common::api::Api::new(&format!("http://127.0.0.1:{http}"));
    let (status, reloaded) = api.call("POST", "/api/rules/reload", Some(token), None);
    assert_eq!(status, 200, "{reloaded}\n{}", run.logs());
    assert_eq!((reloaded["rules"].as_u64(), reloaded["routes"].as_u64(), reloaded["resolved"].as_u64()), (Some(1), Some(1), Some(1)), "{reloaded}");
    let read: String = sha2::Digest::finalize(<sha2::Sha256 as sha2::Digest>::new_with_prefix(busy)).iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(reloaded["rules_hash"].as_str(), Some(read.as_str()), "the hash of the text put in force");
    let gone = hooked(&hook, &mut run, "market-negative", "resolved");
    assert_eq!((&gone["alert_id"], &gone["severity"]), (&fired["alert_id"], &serde_json::json!("critical")), "the alert that fired, as it fired");
    assert!(gone["summary"].as_str().unwrap().contains("no longer in the rule files"), "{gone}");
    let (_, in_force) = api.call("GET", "/api/rules", Some(token), None);
    assert_eq!((&in_force["rules"][0]["name"], &in_force["rules"][0]["condition"]["kind"]), (&serde_json::json!("market-busy"), &serde_json::json!("threshold")), "{in_force}");
    assert_eq!((&in_force["rules_hash"], &in_force["refused"]), (&reloaded["rules_hash"], &serde_json::Value::Null));
    // The new rule is in force for what comes next.
    send("next.jsonl", "{\"id\":\"n1\",\"published_at\":\"1987-03-02T12:10:00Z\",\"headline\":\"Exports surge to all-time high\"}\n");
    hooked(&hook, &mut run, "market-busy", "firing");

    // Files that do not check (SIGHUP this time) change nothing, and say why until a good reload.
    std::fs::write(dir.path().join("rules.toml"), busy.replace("value = 1", "value = \"one\"")).unwrap();
    run.signal("HUP");
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let ready = || agent.get(format!("http://127.0.0.1:{http}/ready")).call().unwrap().body_mut().read_to_string().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ready().contains("warning: the rule files were not reloaded") {
        assert!(Instant::now() < deadline && run.child.try_wait().unwrap().is_none(), "no warning after SIGHUP\n{}", run.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(ready().contains("rules.toml:"), "names the file and line: {}", ready());
    let (status, refused) = api.call("POST", "/api/rules/reload", Some(token), None);
    assert_eq!(status, 400, "{refused}");
    assert!(refused["error"].as_str().unwrap().contains("rules.toml:"), "{refused}");
    let (_, in_force) = api.call("GET", "/api/rules", Some(token), None);
    assert!(in_force["refused"].as_str().unwrap().contains("rules.toml:") && in_force["rules"][0]["name"] == "market-busy", "{in_force}");
    let metrics = agent.get(format!("http://127.0.0.1:{http}/metrics")).call().unwrap().body_mut().read_to_string().unwrap();
    assert!(metrics.contains("bearwatch_rules_last_reload_successful 0"), "{metrics}");
    assert!(metrics.contains("bearwatch_rules_reloads_total{outcome=\"refused\"} 2"), "{metrics}");
    assert_eq!(api.call("POST", "/api/rules/reload", None, None).0, 401, "admins only");

    // A restart with `market-busy` gone from the files resolves its alert too.
    std::fs::write(dir.path().join("rules.toml"), RULES.replace("receivers = [\"mail\", \"hook\"]", "receivers = [\"hook\"]")).unwrap();
    run.signal("TERM");
    assert!(run.wait(Duration::from_secs(60)).success(), "{}", run.logs());
    let mut run = Pipeline::start(dir.path(), "p", &config);
    let gone = hooked(&hook, &mut run, "market-busy", "resolved");
    assert_eq!(gone["severity"], "info");
    run.signal("TERM");
    assert!(run.wait(Duration::from_secs(60)).success(), "{}", run.logs());
    let states = query(&run.storage, "SELECT rule, state FROM alerts ORDER BY rule, state");
    assert_eq!(states, [["market-busy", "firing"], ["market-busy", "resolved"], ["market-negative", "firing"], ["market-negative", "resolved"]]);
}

/// A reload also reads the pipeline file's `[[receivers]]` and `[alerts] rules`, as Alertmanager
/// reloads its receivers: a receiver added, with a rule file routed to it, gets the new rule's
/// alerts without a restart, and a receiver taken out has its pending notices dropped with the
/// reason (not retried for a day). Any other change to the pipeline file is refused by name, and
/// nothing is applied. Before, a route to a receiver added to the pipeline file was refused until a
/// restart.
#[test]
fn a_reload_reads_the_pipeline_files_receivers_and_refuses_other_changes() {
    let dir = tempfile::tempdir().unwrap();
    let topic = common::unique("reload-receivers");
    common::create_topic_on(common::brokers(), &topic, 1);
    let (hook_a, hook_b) = (WebhookServer::start(), WebhookServer::start());
    let http = free_port();
    let token = "t0ken-0123456789abcdef";
    std::fs::write(dir.path().join("rules.toml"), RULES.replace("receivers = [\"mail\", \"hook\"]", "receivers = [\"a\"]\nmatch = { rule = \"market-negative\" }")).unwrap();
    std::fs::write(
        dir.path().join("busy.toml"),
        "[[rules]]\nname = \"market-busy\"\nseverity = \"info\"\ngroup = \"all\"\nmetric = \"n\"\n\
         [rules.condition]\nkind = \"threshold\"\nop = \">=\"\nvalue = 1\n\n[[routes]]\nreceivers = [\"b\"]\nmatch = { rule = \"market-busy\" }\n",
    )
    .unwrap();
    let group = common::unique("group");
    let hook = |name: &str, port: u16| format!("[[receivers]]\nname = \"{name}\"\ntype = \"webhook\"\nurl = \"http://127.0.0.1:{port}/alerts\"\ntimeout = \"2s\"\n");
    let config = |rules: &str, window: &str, receivers: &str| {
        format!(
            "[source]\ntype = \"kafka\"\nbrokers = \"{brokers}\"\ntopics = [\"{topic}\"]\ngroup_id = \"{group}\"\ndead_letter_topic = \"{topic}.dlq\"\n\
             [source.properties]\n\"session.timeout.ms\" = \"6000\"\n\
             [window]\nsize = \"{window}\"\nallowed_lateness = \"0s\"\n[storage]\npath = \"store\"\ncheckpoint_interval = \"200ms\"\n\
             [run]\nsummary_interval = \"0s\"\n[alerts]\nrules = [{rules}]\n\
             [server]\nhttp = \"127.0.0.1:{http}\"\nauth_token = \"{token}\"\n{receivers}",
            brokers = common::brokers(),
        )
    };
    let send = |name: &str, lines: &str| {
        std::fs::write(dir.path().join(name), lines).unwrap();
        common::produce_to(common::brokers(), &topic, &dir.path().join(name));
    };
    let mut run = Pipeline::start(dir.path(), "p", &config("\"rules.toml\"", "1h", &hook("a", hook_a.port)));
    send("bad.jsonl", &stories().lines().take(3).map(|l| format!("{l}\n")).collect::<String>());
    hooked(&hook_a, &mut run, "market-negative", "firing");
    let api = common::api::Api::new(&format!("http://127.0.0.1:{http}"));

    // Receiver b and a rule file routed to it, added together.
    let both = config("\"rules.toml\", \"busy.toml\"", "1h", &(hook("a", hook_a.port) + &hook("b", hook_b.port)));
    std::fs::write(dir.path().join("p.toml"), &both).unwrap();
    let (status, reloaded) = api.call("POST", "/api/rules/reload", Some(token), None);
    assert_eq!(status, 200, "{reloaded}\n{}", run.logs());
    assert_eq!((reloaded["rules"].as_u64(), reloaded["receivers"].as_u64(), reloaded["resolved"].as_u64()), (Some(2), Some(2), Some(0)), "{reloaded}");
    send("next.jsonl", "{\"id\":\"n1\",\"published_at\":\"1987-03-02T12:10:00Z\",\"headline\":\"Exports surge to all-time high\"}\n");
    hooked(&hook_b, &mut run, "market-busy", "firing");

    // Another section changed: refused by name, and nothing of it applied (b stays).
    std::fs::write(dir.path().join("p.toml"), both.replace("size = \"1h\"", "size = \"2h\"").replace(&hook("b", hook_b.port), "")).unwrap();
    let (status, refused) = api.call("POST", "/api/rules/reload", Some(token), None);
    assert_eq!(status, 400, "{refused}");
    let error = refused["error"].as_str().unwrap();
    assert!(error.contains("p.toml") && error.contains("[window]") && error.contains("restart"), "{error}");
    let (_, in_force) = api.call("GET", "/api/rules", Some(token), None);
    assert_eq!(in_force["rules"].as_array().map(Vec::len), Some(2), "{in_force}");

    // An API with tokens is not opened by a reload.
    std::fs::write(dir.path().join("p.toml"), both.replace(&format!("auth_token = \"{token}\"\n"), "")).unwrap();
    let (status, refused) = api.call("POST", "/api/rules/reload", Some(token), None);
    assert!(status == 400 && refused["error"].as_str().unwrap().contains("tokens to none"), "{status} {refused}");

    // b taken out with its rule file: market-busy resolves, and its notice for b is dropped. The
    // admin token is rotated in the same reload: the old one is refused from then on.
    let rotated = "r0tated-0123456789abcdef";
    std::fs::write(dir.path().join("p.toml"), config("\"rules.toml\"", "1h", &hook("a", hook_a.port)).replace(token, rotated)).unwrap();
    let (status, reloaded) = api.call("POST", "/api/rules/reload", Some(token), None);
    assert_eq!(status, 200, "{reloaded}\n{}", run.logs());
    assert_eq!(api.call("GET", "/api/rules", Some(token), None).0, 401, "the old token is revoked");
    let token = rotated;
    assert_eq!((reloaded["rules"].as_u64(), reloaded["receivers"].as_u64(), reloaded["resolved"].as_u64()), (Some(1), Some(1), Some(1)), "{reloaded}");
    let dropped = "SELECT status, last_error FROM notifications WHERE receiver = 'b' AND state = 'resolved' AND status = 'dropped'";
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let rows = api.sql(Some(token), dropped);
        if let Some(row) = rows.first() {
            assert_eq!(row["last_error"], "receiver `b` is no longer in the pipeline", "{rows:?}");
            break;
        }
        assert!(Instant::now() < deadline && run.child.try_wait().unwrap().is_none(), "no dropped notice for b\n{}", run.logs());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(!hook_b.requests.lock().unwrap().iter().any(|(_, a)| a["state"] == "resolved"), "nothing went to b after it was taken out");
    assert!(!hook_a.requests.lock().unwrap().iter().any(|(_, a)| a["rule"] == "market-busy"), "a was never routed market-busy");
    run.signal("TERM");
    assert!(run.wait(Duration::from_secs(60)).success(), "{}", run.logs());
}
