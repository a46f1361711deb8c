//! Runs every query of docs/SQL.md on a fixed synthetic dataset and compares the answers with
//! `tests/sql/golden/NN.csv`. After a deliberate change: `BEARWATCH_BLESS=1 cargo test --test sql_golden`.
//!
//! The dataset is made without the model, so that answers do not depend on the CPU's float rounding.
//! The tables are written by bearwatch's own code: windows, detector and storage.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bearwatch::alert::notifications_batch;
use bearwatch::alert::notify::NotificationRow;
use bearwatch::news::Scores;
use bearwatch::config::HumanDuration;
use bearwatch::detect::rules::{Op, Severity};
use bearwatch::detect::{Condition, Detector, GroupKind, Metric, Rule, alerts_batch};
use bearwatch::news::{News, ScoredNews};
use bearwatch::rng::Lcg;
use bearwatch::sql::{self, Format};
use bearwatch::classify::news_batch;
use bearwatch::storage::{Storage, Table};
use bearwatch::window::{Headline, WindowSpec, WindowState, windows_batch};
use bearwatch::feedback::applied_labels_batch;

const H: i64 = 3_600_000;
/// 1987-03-02T00:00:00Z.
const START: i64 = 541_641_600_000;

fn time(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).unwrap().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn write_dataset(dir: &Path) {
    let (mut storage, _) = Storage::open::<serde::de::IgnoredAny>(&dir.into(), None, false).unwrap();
    let topics = ["earnings", "energy", "macro", "metals"];
    let mut rng = Lcg(7);
    let spec = WindowSpec { size_ms: H, slide_ms: H, allowed_lateness_ms: 0, by_ticker: false };
    let mut windows = WindowState::new(spec);
    let mut news = Vec::new();
    let mut late = Vec::new();
    for i in 0..800i64 {
        // One story every 12.6 minutes over a week; energy turns sour on the last two days.
        let published_ms = START + i * 756_000;
        let topic = topics[(rng.next_f64() * 4.0) as usize];
        let sour = topic == "energy" && published_ms > START + 5 * 24 * H;
        let p_negative = ((rng.next_f64() * if sour { 1.6 } else { 0.8 }) as f32).min(0.99);
        let p_positive = ((1.0 - p_negative) * rng.next_f64() as f32 * 0.9).max(0.0);
        let p_neutral = 1.0 - p_negative - p_positive;
        let sentiment = bearwatch::classify::sentiment_label(&[p_negative, p_neutral, p_positive]);
        let round = |p: f32| (p * 1e6).round() / 1e6;
        let scores = Scores {
            topic: topic.to_string(),
            topic_score: 0.9,
            sentiment,
            p_negative: round(p_negative),
            p_neutral: round(p_neutral),
            p_positive: round(p_positive),
            sentiment_score: round(p_positive - p_negative),
            model: Arc::from("synthetic@1"),
        };
        let headline = format!("{topic} story {i}");
        let row = ScoredNews {
            news: News {
                id: format!("n{i:04}"),
                published_at: time(published_ms),
                headline: headline.clone(),
                body: None,
                source: Some("synthetic".into()),
                tickers: (i % 9 == 0).then(|| vec![if i % 2 == 0 { "XOM".into() } else { "CVX".into() }]),
                url: None,
                lang: None,
                extra: Default::default(),
            },
            scores,
            ingested_at: time(published_ms + 1000),
            kafka_partition: Some((i % 3) as i32),
            kafka_offset: Some(i / 3),
            published_ms,
            ingested_ms: published_ms + 1000,
        };
        let story = Headline { id: row.news.id.clone(), headline, p_negative: row.scores.p_negative, why: vec![] };
        windows.add(&bearwatch::window::Counted {
            event_ms: published_ms,
            topic: topic.into(),
            tickers: Vec::new(),
            sentiment: sentiment.into(),
            sentiment_score: row.scores.sentiment_score,
            story,
            cluster: 0,
        });
        windows.advance("golden", published_ms);
        news.push(row);
        // Every 100th story also arrives again, three hours late.
        if i % 100 == 99 {
            let mut again = news.last().unwrap().clone();
            again.news.id = format!("late{i}");
            again.published_ms -= 3 * H;
            again.news.published_at = time(again.published_ms);
            late.push(again);
        }
    }
    let final_rows = windows.close_all(START + 8 * 24 * H);
    let rule = Rule {
        name: "negative-share".into(),
        severity: Severity::Critical,
        group: GroupKind::Topic,
        metric: Metric::NegShare,
        condition: Condition::Threshold { op: Op::Above, value: 0.6, min_count: 3, exit_value: Some(0.4) },
        pending_for: HumanDuration::parse("0s").unwrap(),
        keep_firing_for: HumanDuration::parse("0s").unwrap(),
        // Thin hours hold an alert for a day, so the last ones are still firing for query 7.
        quiet_for: Some(HumanDuration::parse("1d").unwrap()),
        labels: BTreeMap::new(),
    };
    let mut detector = Detector::new(vec![rule]);
    let mut alerts = Vec::new();
    for row in &final_rows {
        for alert in detector.evaluate(std::slice::from_ref(row), row.end_ms) {
            alerts.push((alert, row.end_ms + 1000));
        }
    }
    let mut notifications = Vec::new();
    for (n, (alert, at)) in alerts.iter().enumerate() {
        let state = alert.state.as_str().to_string();
        let key = format!("{}/{state}/mail", alert.alert_id);
        // Every third notice needed a retry: a failed attempt first.
        let retried = n % 3 == 0;
        let row = |status: &str, attempts, error: Option<&str>, sent: Option<i64>, recorded| NotificationRow {
            key: key.clone(),
            alert_id: alert.alert_id.clone(),
            state: state.clone(),
            receiver: "mail".into(),
            status: status.into(),
            attempts,
            last_error: error.map(str::to_string),
            sent_ms: sent,
            recorded_ms: recorded,
        };
        notifications.push(row("pending", 0, None, None, *at));
        if retried {
            notifications.push(row("pending", 1, Some("connection refused"), None, at + 500));
        }
        let attempts = if retried { 2 } else { 1 };
        notifications.push(row("sent", attempts, retried.then_some("connection refused"), Some(at + 1500), at + 1500));
    }
    storage.write(Table::News, &news_batch(&news).unwrap()).unwrap();
    storage.write(Table::Late, &news_batch(&late).unwrap()).unwrap();
    storage.write(Table::Windows, &windows_batch(&final_rows).unwrap()).unwrap();
    storage.write(Table::Alerts, &alerts_batch(&alerts).unwrap()).unwrap();
    storage.write(Table::Notifications, &notifications_batch(&notifications).unwrap()).unwrap();
    write_feedback(dir, &alerts.iter().map(|(a, _)| (a.alert_id.clone(), a.rule.clone())).collect::<Vec<_>>());
    storage.write(Table::AppliedLabels, &applied_labels_batch(&applied_labels(&news)).unwrap()).unwrap();
    // Parts are seen once a checkpoint commits them.
    storage.commit(&serde_json::json!({})).unwrap();
}

/// What the pipeline records when corrections act: a judged story, an exact copy that a later
/// `unsure` gives back to the model, a near-duplicate, and a topic correction.
fn applied_labels(news: &[ScoredNews]) -> Vec<bearwatch::feedback::AppliedLabel> {
    use bearwatch::feedback::{AppliedLabel, Head, Match};
    let applied = |story: &ScoredNews, head, label: Option<&str>, feedback: &str, matched, hour: i64| AppliedLabel {
        story_id: story.news.id.clone(),
        text_hash: bearwatch::feedback::text_hash(&story.news.headline),
        head,
        model: "synthetic@1".into(),
        model_label: if head == Head::Sentiment { story.scores.sentiment.to_string() } else { story.scores.topic.clone() },
        label: label.map(str::to_string),
        feedback_id: feedback.into(),
        matched,
        applied_at: chrono::DateTime::from_timestamp_millis(START + 7 * 24 * H + hour * H).unwrap(),
    };
    let negative: Vec<&ScoredNews> = news.iter().filter(|s| s.scores.sentiment == "negative").take(3).collect();
    vec![
        applied(negative[0], Head::Sentiment, Some("neutral"), "f1", Match::Story, 1),
        applied(negative[1], Head::Sentiment, Some("neutral"), "f1", Match::Exact, 1),
        applied(negative[2], Head::Sentiment, Some("neutral"), "f1", Match::Near { shared: 0.75 }, 1),
        applied(negative[1], Head::Sentiment, None, "f6", Match::Exact, 2),
        applied(&news[13], Head::Topic, Some("macro"), "f7", Match::Story, 3),
    ]
}

/// Analysts' judgements at fixed times: a correction that a later one supersedes, a confirmation
/// withdrawn as unsure, a plain correction; and verdicts on the first alerts.
fn write_feedback(dir: &Path, alerts: &[(String, String)]) {
    use bearwatch::feedback::{Action, AlertVerdict, Channel, Head, LabelFeedback, Verdict, record_labels, record_verdicts, text_hash};
    let at = |h: i64| chrono::DateTime::from_timestamp_millis(START + 7 * 24 * H + h * H).unwrap();
    let label = |id: &str, text: &str, head, label: Option<&str>, action, analyst: &str, hour, supersedes: Option<&str>| LabelFeedback {
        feedback_id: id.into(),
        story_id: None,
        text: text.into(),
        text_hash: text_hash(text),
        head,
        model: Some("synthetic@1".into()),
        model_label: Some("negative".into()),
        model_score: Some(0.8),
        analyst_label: label.map(str::to_string),
        action,
        analyst: analyst.into(),
        created_at: at(hour),
        note: None,
        source: Channel::Api,
        supersedes: supersedes.map(str::to_string),
    };
    record_labels(&dir.into(), &[
        label("f1", "OIL PRICES SLUMP", Head::Sentiment, Some("neutral"), Action::Correct, "ana", 1, None),
        label("f2", "OIL PRICES SLUMP", Head::Sentiment, Some("positive"), Action::Correct, "bob", 2, Some("f1")),
        label("f3", "GOLD RISES", Head::Topic, Some("metals"), Action::Confirm, "ana", 3, None),
        label("f4", "GOLD RISES", Head::Topic, None, Action::Unsure, "bob", 4, Some("f3")),
        label("f5", "FED HOLDS RATES", Head::Sentiment, Some("neutral"), Action::Correct, "ana", 5, None),
    ])
    .unwrap();
    let verdicts: Vec<AlertVerdict> = alerts
        .iter()
        .take(4)
        .zip([Verdict::Useful, Verdict::Noise, Verdict::Noise, Verdict::Late])
        .enumerate()
        .map(|(i, ((alert_id, rule), verdict))| AlertVerdict {
            verdict_id: format!("v{i}"),
            alert_id: alert_id.clone(),
            rule: rule.clone(),
            rules_hash: None,
            verdict,
            analyst: "ana".into(),
            created_at: at(6 + i as i64),
            note: None,
            supersedes: None,
        })
        .collect();
    record_verdicts(&dir.into(), &verdicts).unwrap();
}

/// The ```sql blocks of docs/SQL.md, in order.
fn documented_queries() -> Vec<String> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/SQL.md")).unwrap();
    doc.split("```sql\n").skip(1).map(|block| block.split("```").next().unwrap().trim().to_string()).collect()
}

#[test]
fn the_documented_queries_give_the_pinned_answers() {
    let dir = tempfile::tempdir().unwrap();
    write_dataset(dir.path());
    let queries = documented_queries();
    assert!(queries.len() >= 10, "docs/SQL.md should show at least 10 queries");
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sql/golden");
    let bless = std::env::var_os("BEARWATCH_BLESS").is_some();
    for (index, query) in queries.iter().enumerate() {
        let ctx = sql::context(&dir.path().into(), sql::Limits { memory_bytes: 256 << 20, timeout: Duration::from_secs(60) }, None).unwrap();
        let batches = runtime.block_on(sql::run(&ctx, query)).unwrap_or_else(|e| panic!("query {}: {e}\n{query}", index + 1));
        let answer = String::from_utf8(sql::encode(&batches, Format::Csv).unwrap()).unwrap();
        let path = golden.join(format!("{:02}.csv", index + 1));
        if bless {
            std::fs::create_dir_all(&golden).unwrap();
            std::fs::write(&path, &answer).unwrap();
        }
        let expected = std::fs::read_to_string(&path).unwrap_or_else(|_| panic!("{} missing: run with BEARWATCH_BLESS=1", path.display()));
        assert_eq!(answer, expected, "query {} of docs/SQL.md:\n{query}", index + 1);
        assert!(answer.lines().count() > 1, "query {} answers nothing on the dataset; pick a better one:\n{query}", index + 1);
    }
}
