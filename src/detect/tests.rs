use super::*;
use crate::config::HumanDuration;

const H: i64 = 3_600_000;

fn counts(n: u64, n_negative: u64) -> Counts {
    Counts { n, n_negative, n_neutral: n - n_negative, n_positive: 0, sentiment_micros: -(n_negative as i64) * 1_000_000, n_copies: 0 }
}

fn row(start_h: i64, size_h: i64, topic: &str, n: u64, n_negative: u64, final_row: bool) -> WindowRow {
    let key = WindowKey { start_ms: start_h * H, topic: topic.into(), ticker: None };
    let top = vec![Headline { id: "s1".into(), headline: "Oil slumps".into(), p_negative: 0.97, why: vec![] }];
    WindowRow::new(key, size_h * H, counts(n, n_negative), top, final_row, 0)
}

fn rule(metric: Metric, group: GroupKind, condition: Condition) -> Rule {
    Rule {
        name: "r".into(),
        severity: rules::Severity::Warning,
        group,
        metric,
        condition,
        pending_for: HumanDuration::parse("0s").unwrap(),
        keep_firing_for: HumanDuration::parse("0s").unwrap(),
        quiet_for: None,
        labels: BTreeMap::new(),
    }
}

/// ElastAlert's spike rule (`spike_height: 4`, `threshold_cur: 15`, `timeframe: 2h`, `spike_type:
/// up`) compares the count of the current 2-hour timeframe with the one before. Its `find_matches`:
/// no match below `threshold_cur` or when either count is 0, else a match when cur ≥ ref × 4.
#[test]
fn ratio_to_baseline_matches_elastalerts_spike_rule() {
    let spike = Condition::RatioToBaseline {
        factor: 4.0,
        baseline_windows: 1,
        min_count: 15,
        min_baseline_count: 0,
        min_baseline_window_count: 0,
        min_value: 0.0,
        exit_factor: None,
    };
    let cases = [
        (5, 20, true),
        (5, 19, false),
        (3, 14, false), // 14 ≥ 3 × 4, but under threshold_cur
        (3, 15, true),
        (4, 16, true),
        (10, 40, true),
        (10, 39, false),
        (0, 100, false), // no spike from nothing
        (20, 15, false),
    ];
    for (reference, current, fires) in cases {
        let reading = read(&spike, Metric::N, &counts(current, 0), &Baselines::own(&[&counts(reference, 0)]));
        assert_eq!(reading.verdict == Verdict::Breach, fires, "ref {reference}, cur {current}: {reading:?}");
    }

    // The same through the detector: 2-hour windows, one alert for the window that spikes.
    let mut detector = Detector::new(vec![rule(Metric::N, GroupKind::Topic, spike)]);
    assert!(detector.evaluate(&[row(0, 2, "energy", 5, 0, true)], 2 * H).is_empty(), "silent without a baseline");
    assert!(detector.evaluate(&[row(2, 2, "energy", 19, 0, false)], 3 * H).is_empty());
    let fired = detector.evaluate(&[row(2, 2, "energy", 20, 0, false)], 3 * H);
    assert_eq!(fired.len(), 1);
    let alert = &fired[0];
    assert_eq!((alert.state, alert.value, alert.baseline, alert.threshold, alert.count), (AlertState::Firing, 20.0, Some(5.0), 20.0, 20));
    assert_eq!(alert.group, BTreeMap::from([("topic".to_string(), "energy".to_string())]));
    assert_eq!((alert.window_start.as_str(), alert.window_end.as_str()), ("1970-01-01T02:00:00Z", "1970-01-01T04:00:00Z"));
    assert_eq!(alert.top_headlines[0].headline, "Oil slumps");
    assert_eq!(alert.summary, "energy: stories 20 is 4.0× its baseline 5 (alert at 4×) over 20 stories, 1970-01-01 02:00 to 1970-01-01 04:00");
}

#[test]
fn flapping_values_give_one_firing_and_one_resolved_notice() {
    let threshold =
        Condition::Threshold { op: rules::Op::Above, value: 0.4, min_count: 10, exit_value: Some(0.3) };
    let mut detector = Detector::new(vec![rule(Metric::NegShare, GroupKind::All, threshold)]);
    let mut changes = Vec::new();
    // Hovering around 0.4 (never under the exit level 0.3) until the last hours; one thin hour decides nothing.
    for (hour, (n, negative)) in [(20, 9), (20, 7), (20, 9), (20, 7), (3, 0), (20, 9), (20, 8), (20, 5), (20, 2)].into_iter().enumerate() {
        let hour = hour as i64;
        changes.extend(detector.evaluate(&[row(hour, 1, "all", n, negative, true)], (hour + 1) * H));
    }
    let states: Vec<AlertState> = changes.iter().map(|a| a.state).collect();
    assert_eq!(states, [AlertState::Firing, AlertState::Resolved]);
    assert_eq!(changes[0].alert_id, changes[1].alert_id);
    assert_eq!(changes[1].resolved_at.as_deref(), Some("1970-01-01T08:00:00Z"), "when 5 of 20 (0.25) fell under 0.3");
}

#[test]
fn for_and_keep_firing_for_are_measured_in_event_time() {
    let threshold = Condition::Threshold { op: rules::Op::AtLeast, value: 5.0, min_count: 0, exit_value: None };
    let mut r = rule(Metric::NNegative, GroupKind::Topic, threshold);
    r.pending_for = HumanDuration::parse("1h").unwrap();
    r.keep_firing_for = HumanDuration::parse("2h").unwrap();
    let mut detector = Detector::new(vec![r]);
    let at = |d: &mut Detector, start_h: i64, negative: u64, now_h: i64| d.evaluate(&[row(start_h, 1, "macro", 10, negative, false)], now_h * H);
    assert!(at(&mut detector, 0, 6, 0).is_empty(), "pending");
    assert!(at(&mut detector, 0, 6, 0).is_empty());
    let fired = at(&mut detector, 1, 7, 1);
    assert_eq!(fired.len(), 1, "fires once the condition held for 1 h");
    assert_eq!(fired[0].started_at, "1970-01-01T01:00:00Z");
    assert!(at(&mut detector, 2, 1, 2).is_empty(), "kept firing");
    let resolved = at(&mut detector, 3, 1, 3);
    assert_eq!(resolved.len(), 1, "resolved 2 h after the last breach (at 1 h)");
    assert_eq!(resolved[0].state, AlertState::Resolved);

    // A breach that goes away before `for` elapses never fires.
    assert!(at(&mut detector, 10, 6, 10).is_empty());
    assert!(at(&mut detector, 10, 1, 10).is_empty());
    assert!(at(&mut detector, 11, 6, 11).is_empty(), "pending again from scratch");
}

#[test]
fn a_firing_alert_resolves_when_its_group_goes_quiet() {
    let threshold = Condition::Threshold { op: rules::Op::Above, value: 0.4, min_count: 5, exit_value: None };
    let mut r = rule(Metric::NegShare, GroupKind::Topic, threshold);
    r.keep_firing_for = HumanDuration::parse("1h").unwrap();
    let mut detector = Detector::new(vec![r.clone()]);
    assert_eq!(detector.evaluate(&[row(0, 2, "energy", 10, 8, true)], 2 * H).len(), 1, "fires");
    // Energy gets no more stories (so no rows); other topics move the watermark on.
    assert!(detector.evaluate(&[row(2, 2, "metals", 10, 1, true)], 4 * H).is_empty(), "two window lengths (4 h) not yet over");
    let resolved = detector.evaluate(&[row(3, 2, "metals", 10, 1, true)], 6 * H);
    assert_eq!(resolved.len(), 1, "resolved 4 h after the last breach: {resolved:?}");
    let quiet = &resolved[0];
    assert_eq!((quiet.state, quiet.group["topic"].as_str()), (AlertState::Resolved, "energy"));
    assert_eq!(quiet.resolved_at.as_deref(), Some("1970-01-01T06:00:00Z"));
    assert_eq!((quiet.window_end.as_str(), quiet.value, quiet.count), ("1970-01-01T02:00:00Z", 0.8, 10), "the last window it read");
    assert!(quiet.summary.starts_with("energy: resolved as quiet, nothing has held the alert since 1970-01-01T02:00:00Z"), "{}", quiet.summary);
    assert_eq!(detector.firing(), 0);

    // Windows too thin to decide (under min_count) hold it no longer than no windows at all.
    let mut detector = Detector::new(vec![r.clone()]);
    assert_eq!(detector.evaluate(&[row(0, 2, "energy", 10, 8, true)], 2 * H).len(), 1);
    assert!(detector.evaluate(&[row(2, 2, "energy", 2, 2, true)], 4 * H).is_empty(), "2 of 2 negative decides nothing");
    assert_eq!(detector.evaluate(&[row(4, 2, "energy", 3, 3, true)], 6 * H)[0].state, AlertState::Resolved);

    // `quiet_for` sets the time; `keep_firing_for` is the least it can be.
    r.quiet_for = Some(HumanDuration::parse("30m").unwrap());
    let mut detector = Detector::new(vec![r.clone()]);
    assert_eq!(detector.evaluate(&[row(0, 2, "energy", 10, 8, true)], 2 * H).len(), 1);
    assert!(detector.evaluate(&[row(2, 2, "metals", 10, 1, true)], 2 * H + H / 2).is_empty(), "keep_firing_for (1 h) wins over 30 m");
    assert_eq!(detector.evaluate(&[row(3, 2, "metals", 10, 1, true)], 3 * H).len(), 1);
    r.quiet_for = Some(HumanDuration::parse("10h").unwrap());
    let mut detector = Detector::new(vec![r]);
    assert_eq!(detector.evaluate(&[row(0, 2, "energy", 10, 8, true)], 2 * H).len(), 1);
    assert!(detector.evaluate(&[row(2, 2, "metals", 10, 1, true)], 11 * H).is_empty());
    assert_eq!(detector.evaluate(&[row(3, 2, "metals", 10, 1, true)], 12 * H).len(), 1);
}

#[test]
fn a_breach_after_a_long_silence_waits_its_for_again() {
    let threshold = Condition::Threshold { op: rules::Op::Above, value: 0.4, min_count: 5, exit_value: None };
    let mut r = rule(Metric::NegShare, GroupKind::Topic, threshold);
    r.pending_for = HumanDuration::parse("2h").unwrap();
    let mut detector = Detector::new(vec![r]);
    assert!(detector.evaluate(&[row(0, 1, "energy", 10, 8, true)], H).is_empty(), "pending");
    // Thin windows (undecided) keep it pending, but not past `quiet_for` (two 1 h windows).
    assert!(detector.evaluate(&[row(1, 1, "energy", 2, 2, true)], 2 * H).is_empty());
    assert!(detector.evaluate(&[row(2, 1, "energy", 2, 2, true)], 3 * H).is_empty());
    assert!(detector.tracked.is_empty(), "forgotten after 2 h without a breach");
    assert!(detector.evaluate(&[row(3, 1, "energy", 10, 8, true)], 4 * H).is_empty(), "pending from scratch, not firing");
    assert!(detector.evaluate(&[row(4, 1, "energy", 10, 8, true)], 5 * H).is_empty());
    assert_eq!(detector.evaluate(&[row(5, 1, "energy", 10, 8, true)], 6 * H).len(), 1, "fires 2 h after the new first breach");

    // Within `quiet_for`, the same path (breach, thin window, breach) still fires at 2 h.
    let threshold = Condition::Threshold { op: rules::Op::Above, value: 0.4, min_count: 5, exit_value: None };
    let mut r = rule(Metric::NegShare, GroupKind::Topic, threshold);
    r.pending_for = HumanDuration::parse("2h").unwrap();
    let mut detector = Detector::new(vec![r]);
    assert!(detector.evaluate(&[row(0, 1, "energy", 10, 8, true)], H).is_empty());
    assert!(detector.evaluate(&[row(1, 1, "energy", 2, 2, true)], 2 * H).is_empty());
    assert_eq!(detector.evaluate(&[row(2, 1, "energy", 10, 8, true)], 3 * H).len(), 1);
}

#[test]
fn closed_windows_are_kept_only_for_the_groups_rules_read_and_at_most_max_groups() {
    let z = Condition::Zscore { sigma: 3.0, baseline_windows: 2, min_count: 0, min_baseline_window_count: 0, exit_sigma: None };
    let mut detector = Detector::new(vec![rule(Metric::N, GroupKind::Ticker, z)]);
    let ticker_row = |start_h: i64, ticker: String| {
        let key = WindowKey { start_ms: start_h * H, topic: ALL.into(), ticker: Some(ticker) };
        WindowRow::new(key, H, counts(3, 0), Vec::new(), true, 0)
    };
    detector.evaluate(&[row(0, 1, "energy", 3, 0, true), row(0, 1, "all", 3, 0, true)], H);
    assert!(detector.history.is_empty(), "no rule reads topics or `all`");
    // A feed that names ever new tickers: the oldest are dropped, never more than MAX_GROUPS held.
    let batch: Vec<WindowRow> = (0..MAX_GROUPS + 1).map(|i| ticker_row(1, format!("T{i}"))).collect();
    detector.evaluate(&batch, 2 * H);
    assert_eq!(detector.history.len(), MAX_GROUPS * 9 / 10);
    detector.evaluate(&[ticker_row(2, "NEW".into())], 3 * H);
    assert!(detector.history.contains_key(&GroupKey { topic: ALL.into(), ticker: Some("NEW".into()) }), "the newest group is kept");
}

#[test]
fn state_from_a_checkpoint_without_the_last_reading_still_loads() {
    let threshold = Condition::Threshold { op: rules::Op::Above, value: 0.4, min_count: 0, exit_value: None };
    let rules = vec![rule(Metric::NegShare, GroupKind::All, threshold)];
    let mut detector = Detector::new(rules.clone());
    assert_eq!(detector.evaluate(&[row(0, 1, "all", 10, 8, true)], H).len(), 1);
    let mut saved = serde_json::to_value(&detector).unwrap();
    saved["tracked"][0][1].as_object_mut().unwrap().remove("seen").expect("the checkpoint keeps the last reading");
    let mut restored = serde_json::from_value::<Detector>(saved).unwrap();
    assert!(restored.replace_rules(rules, H).is_empty());
    assert!(restored.evaluate(&[row(1, 1, "all", 10, 8, true)], 2 * H).is_empty(), "still firing");
    assert_eq!(restored.evaluate(&[row(2, 1, "all", 10, 1, true)], 3 * H)[0].state, AlertState::Resolved);
}

#[test]
fn a_rule_gone_from_the_files_resolves_its_firing_alerts_as_they_fired() {
    let threshold = Condition::Threshold { op: rules::Op::Above, value: 0.4, min_count: 0, exit_value: None };
    let kept = Rule { name: "kept".into(), ..rule(Metric::NegShare, GroupKind::All, threshold.clone()) };
    let gone = Rule {
        name: "gone".into(),
        severity: rules::Severity::Critical,
        labels: BTreeMap::from([("team".to_string(), "desk".to_string())]),
        ..rule(Metric::NegShare, GroupKind::Topic, threshold.clone())
    };
    let slow = Rule { name: "slow".into(), pending_for: HumanDuration::parse("3h").unwrap(), ..rule(Metric::NegShare, GroupKind::Topic, threshold) };
    let mut detector = Detector::new(vec![kept.clone(), gone.clone(), slow]);
    let fired = detector.evaluate(&[row(0, 1, "all", 10, 8, true), row(0, 1, "energy", 10, 6, true)], H);
    assert_eq!(fired.len(), 2, "`slow` is pending");
    // What a restart with edited rule files sees: the state from the checkpoint, then the new rules.
    let mut restored = serde_json::from_str::<Detector>(&serde_json::to_string(&detector).unwrap()).unwrap();
    // `kept` stays, with a label added: its alert resolves as it fired.
    let relabelled = Rule { labels: BTreeMap::from([("team".to_string(), "new".to_string())]), ..kept };
    let resolved = restored.replace_rules(vec![relabelled], 2 * H);
    assert_eq!(resolved.len(), 1, "one alert of a gone rule was firing: {resolved:?}");
    let fired_gone = fired.iter().find(|a| a.rule == "gone").unwrap();
    let alert = &resolved[0];
    assert_eq!((alert.alert_id.as_str(), alert.state, alert.severity), (fired_gone.alert_id.as_str(), AlertState::Resolved, rules::Severity::Critical));
    assert_eq!((&alert.labels, &alert.group), (&gone.labels, &fired_gone.group), "routed as it fired");
    assert_eq!((alert.resolved_at.as_deref(), alert.value, alert.count), (Some("1970-01-01T02:00:00Z"), 0.6, 10));
    assert!(alert.summary.contains("rule `gone` is no longer in the rule files"), "{}", alert.summary);
    assert_eq!(restored.firing(), 1);
    assert_eq!(restored.tracked.len(), 1, "the pending state of `slow` is gone too");
    assert!(restored.evaluate(&[row(1, 1, "all", 10, 8, true)], 3 * H).is_empty(), "`kept` is still firing, not fired again");
    let ended = restored.evaluate(&[row(2, 1, "all", 10, 1, true)], 4 * H);
    assert_eq!((ended.len(), ended[0].state), (1, AlertState::Resolved));
    assert!(ended[0].labels.is_empty(), "routed as it fired, without the label added since: {:?}", ended[0].labels);
}

#[test]
fn zscore_needs_a_baseline_and_fires_past_sigma() {
    let z = Condition::Zscore { sigma: 3.0, baseline_windows: 4, min_count: 0, min_baseline_window_count: 0, exit_sigma: None };
    let past = [counts(10, 2), counts(10, 3), counts(10, 2), counts(10, 3)];
    let refs: Vec<&Counts> = past.iter().collect();
    assert_eq!(read(&z, Metric::NNegative, &counts(10, 9), &Baselines::own(&refs[..3])).verdict, Verdict::Undecided);
    let high = read(&z, Metric::NNegative, &counts(10, 5), &Baselines::own(&refs));
    // mean 2.5, sample sd 0.577: 5 is 4.3σ above.
    assert_eq!(high.verdict, Verdict::Breach, "{high:?}");
    assert!((high.threshold - (2.5 + 3.0 * 0.57735)).abs() < 1e-4);
    assert_eq!(read(&z, Metric::NNegative, &counts(10, 4), &Baselines::own(&refs)).verdict, Verdict::Normal);
}

#[test]
fn state_survives_a_checkpoint_round_trip() {
    let threshold = Condition::Threshold { op: rules::Op::Above, value: 0.4, min_count: 0, exit_value: None };
    let rules = vec![rule(Metric::NegShare, GroupKind::All, threshold)];
    let mut detector = Detector::new(rules.clone());
    assert_eq!(detector.evaluate(&[row(0, 1, "all", 10, 8, true)], H).len(), 1);
    let saved = serde_json::to_string(&detector).unwrap();
    let mut restored = serde_json::from_str::<Detector>(&saved).unwrap();
    assert!(restored.replace_rules(rules, H).is_empty());
    assert_eq!(restored, detector);
    assert!(restored.evaluate(&[row(1, 1, "all", 10, 8, true)], 2 * H).is_empty(), "still firing, not fired again");
    assert_eq!(restored.evaluate(&[row(2, 1, "all", 10, 1, true)], 3 * H)[0].state, AlertState::Resolved);
}

#[test]
fn alert_ids_are_stable() {
    let group = GroupKey { topic: "energy".into(), ticker: None };
    assert_eq!(alert_id("spike", &group, 0), alert_id("spike", &group, 0));
    assert_ne!(alert_id("spike", &group, 0), alert_id("spike", &group, 1));
    assert_eq!(alert_id("spike", &group, 540_000_000_000), "33555cf22381a415", "must never change between versions");
}

#[test]
fn rule_files_report_file_line_and_field() {
    let good = "[[rules]]\nname = \"a\"\ngroup = \"topic\"\nmetric = \"neg_share\"\ncondition = { kind = \"threshold\", op = \">\", value = 0.5 }\n";
    assert_eq!(RuleFile::parse(good, "r.toml").unwrap().rules.len(), 1);
    let err = RuleFile::parse(&good.replace("0.5 }", "0.5, fator = 2 }"), "r.toml").unwrap_err().to_string();
    assert!(err.starts_with("r.toml:5:") && err.contains("fator"), "{err}");
    let err = RuleFile::parse(&good.replace("neg_share", "neg_shares"), "r.toml").unwrap_err().to_string();
    assert!(err.starts_with("r.toml:4:") && err.contains("rules[0].metric"), "{err}");
    let bad_factor = "[[rules]]\nname = \"a\"\ngroup = \"all\"\nmetric = \"n\"\n[rules.condition]\nkind = \"ratio_to_baseline\"\nfactor = 0\n";
    let err = RuleFile::parse(bad_factor, "r.toml").unwrap_err().to_string();
    assert!(err.contains("factor must be positive") && err.contains("rules[0]"), "{err}");
    let twice = format!("{good}{good}");
    let err = RuleFile::parse(&twice, "r.toml").unwrap_err().to_string();
    assert!(err.starts_with("r.toml:7:") && err.contains("used twice"), "{err}");
}

/// The hash a reload records is of the bytes its rules were parsed from, in file order.
#[test]
fn rule_files_read_together_hash_the_text_they_were_parsed_from() {
    use sha2::Digest;
    let dir = tempfile::tempdir().unwrap();
    let rule = |name: &str| format!("[[rules]]\nname = \"{name}\"\ngroup = \"topic\"\nmetric = \"neg_share\"\ncondition = {{ kind = \"threshold\", op = \">\", value = 0.5 }}\n");
    let (a, b) = (dir.path().join("a.toml"), dir.path().join("b.toml"));
    std::fs::write(&a, rule("a")).unwrap();
    std::fs::write(&b, rule("b")).unwrap();
    let (files, sha256) = RuleFile::read_all(&[&a, &b]).unwrap();
    assert_eq!(files.iter().map(|f| f.rules[0].name.as_str()).collect::<Vec<_>>(), ["a", "b"]);
    let expected: String = sha2::Sha256::digest((rule("a") + &rule("b")).as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(sha256, expected);
    assert_ne!(RuleFile::read_all(&[&b, &a]).unwrap().1, sha256, "the order of the files is part of what was read");
    std::fs::write(&b, rule("a")).unwrap();
    let err = RuleFile::read_all(&[&a, &b]).unwrap_err().to_string();
    assert!(err.contains("also defined in"), "{err}");
}

#[test]
fn sql_conditions_fire_for_the_groups_the_query_returns() {
    let query = "SELECT topic, neg_share AS value FROM windows WHERE topic <> 'all' AND n >= 10 AND neg_share >= 0.5";
    let mut detector = Detector::new(vec![rule(Metric::NegShare, GroupKind::Topic, Condition::Sql { query: query.into() })]);
    let fired = detector.evaluate(&[row(0, 1, "energy", 10, 6, false), row(0, 1, "metals", 10, 1, false)], H);
    assert_eq!(fired.len(), 1);
    assert_eq!((fired[0].group["topic"].as_str(), fired[0].value), ("energy", 0.6));
    assert!(fired[0].summary.contains("matched by the rule's query"), "{}", fired[0].summary);
    let resolved = detector.evaluate(&[row(1, 1, "energy", 10, 2, false)], 2 * H);
    assert_eq!(resolved[0].state, AlertState::Resolved);

    let err = RuleFile::parse(
        "[[rules]]\nname = \"q\"\ngroup = \"topic\"\nmetric = \"n\"\ncondition = { kind = \"sql\", query = \"DELETE FROM windows\" }\n",
        "r.toml",
    )
    .unwrap_err()
    .to_string();
    assert!(err.starts_with("r.toml:1:") && err.contains("rule `q`: condition") && err.contains("DML not supported"), "{err}");
}

#[test]
fn binomial_tails_match_exact_sums() {
    // 8 or more heads of 10 fair coins: (45 + 10 + 1) / 1024.
    assert!((Usual::Share(0.5).tail(8, 10) - 56.0 / 1024.0).abs() < 1e-12);
    assert_eq!(Usual::Share(0.3).tail(0, 10), 1.0);
    assert_eq!(Usual::Share(0.3).tail(11, 10), 0.0);
    assert_eq!(Usual::Share(0.0).tail(1, 10), 0.0, "no negatives usually: any is impossible under it");
    // Thousands of stories neither overflow nor underflow.
    let tail = Usual::Share(0.25).tail(600, 2000);
    assert!(tail > 0.0 && tail < 1e-5, "{tail}");
    assert!((Usual::Share(0.25).tail(500, 2000) - 0.5).abs() < 0.02);
    // The threshold is the first count whose tail is under alpha.
    for (n, p, alpha) in [(10, 0.5, 0.06), (68, 0.13, 0.001), (400, 0.2, 0.01), (5, 0.0, 0.01)] {
        let k = Usual::Share(p).threshold(n, alpha).unwrap();
        assert!(Usual::Share(p).tail(k, n) < alpha, "{n} {p} {k}");
        assert!(k == 0 || Usual::Share(p).tail(k - 1, n) >= alpha, "{n} {p} {k}");
    }
    assert_eq!(Usual::Share(0.9).threshold(3, 0.001), None, "3 of 3 is usual at 90 %");
}

fn binomial(p_value: f64, min_effect: f64) -> Condition {
    Condition::Binomial {
        p_value,
        baseline_windows: 3,
        min_effect,
        min_count: 10,
        min_negative: 0,
        min_baseline_count: 50,
        min_baseline_window_count: 20,
        exit_p_value: None,
        prior_stories: 0.0,
    }
}

#[test]
fn binomial_counts_stories_pools_the_baseline_and_skips_thin_windows() {
    // 13 % usual over 300 stories; a weekend window of 2 stories, both negative, is skipped.
    let past = [counts(100, 13), counts(100, 13), counts(2, 2), counts(100, 13)];
    let refs: Vec<&Counts> = past.iter().collect();
    let rule = binomial(0.001, 0.05);
    let strong = read(&rule, Metric::NegShare, &counts(68, 31), &Baselines::own(&refs));
    assert_eq!(strong.verdict, Verdict::Breach);
    assert!((strong.baseline.unwrap() - 0.13).abs() < 1e-12, "pooled over the 3 full windows: {strong:?}");
    assert!(strong.threshold > 0.13 && strong.threshold <= 1.0, "{strong:?}");
    // The same share over 11 stories is no evidence at p < 0.001.
    assert_ne!(read(&rule, Metric::NegShare, &counts(11, 5), &Baselines::own(&refs)).verdict, Verdict::Breach);
    // Too few stories now, or too few full windows before: undecided.
    assert_eq!(read(&rule, Metric::NegShare, &counts(9, 9), &Baselines::own(&refs)).verdict, Verdict::Undecided);
    assert_eq!(read(&rule, Metric::NegShare, &counts(68, 31), &Baselines::own(&refs[2..])).verdict, Verdict::Undecided);
    // A significant but tiny rise is held back by min_effect.
    let big = [counts(10_000, 1300), counts(10_000, 1300), counts(10_000, 1300)];
    let big: Vec<&Counts> = big.iter().collect();
    assert_eq!(read(&rule, Metric::NegShare, &counts(10_000, 1450), &Baselines::own(&big)).verdict, Verdict::Normal);
    assert_eq!(read(&binomial(0.001, 0.0), Metric::NegShare, &counts(10_000, 1450), &Baselines::own(&big)).verdict, Verdict::Breach);
}

#[test]
fn share_thresholds_stay_within_the_share_range_and_ratio_baselines_are_pooled() {
    // A mean share 0.5 with a wide spread: mean + 2.5 sd is above 1, printed as 1.
    let z = Condition::Zscore { sigma: 2.5, baseline_windows: 3, min_count: 0, min_baseline_window_count: 0, exit_sigma: None };
    let past = [counts(10, 0), counts(10, 10), counts(10, 5)];
    let refs: Vec<&Counts> = past.iter().collect();
    assert_eq!(read(&z, Metric::NegShare, &counts(10, 6), &Baselines::own(&refs)).threshold, 1.0);
    // 2 of 2 on a weekend and 40 of 400 on a weekday: pooled 42 / 402, not the mean 0.55.
    let ratio = Condition::RatioToBaseline {
        factor: 2.0,
        baseline_windows: 2,
        min_count: 0,
        min_baseline_count: 0,
        min_baseline_window_count: 0,
        min_value: 0.0,
        exit_factor: None,
    };
    let past = [counts(2, 2), counts(400, 40)];
    let refs: Vec<&Counts> = past.iter().collect();
    let reading = read(&ratio, Metric::NegShare, &counts(100, 30), &Baselines::own(&refs));
    assert!((reading.baseline.unwrap() - 42.0 / 402.0).abs() < 1e-12, "{reading:?}");
    assert_eq!(reading.verdict, Verdict::Breach);
}

#[test]
fn beta_binomial_tails_match_exact_sums_and_approach_the_binomial() {
    // Beta(1, 1) is uniform: X is uniform on 0..=n, so P(X ≥ k) = (n − k + 1) / (n + 1).
    for (k, n) in [(0, 5), (3, 5), (5, 5), (7, 10)] {
        let exact = (n - k + 1) as f64 / (n + 1) as f64;
        assert!((Usual::Beta(1.0, 1.0).tail(k, n) - exact).abs() < 1e-12, "{k} {n}");
    }
    // A share known from a million stories is the binomial's.
    let (sure, known) = (Usual::Beta(130_000.0, 870_000.0), Usual::Share(0.13));
    assert!((sure.tail(20, 68) - known.tail(20, 68)).abs() < 1e-4);
    // Uncertainty about the share widens the tail: the same count is weaker evidence.
    assert!(Usual::Beta(1.3, 8.7).tail(20, 68) > 10.0 * known.tail(20, 68));
    for (n, usual, alpha) in [(12, Usual::Beta(2.0, 12.0), 1e-4), (68, Usual::Beta(13.5, 87.5), 0.001), (400, Usual::Beta(40.0, 160.0), 0.01)] {
        let k = usual.threshold(n, alpha).unwrap();
        assert!(usual.tail(k, n) < alpha && (k == 0 || usual.tail(k - 1, n) >= alpha), "{n} {usual:?} {k}");
    }
    assert_eq!(Usual::Beta(1.0, 1.0).threshold(3, 0.001), None, "under a uniform share 3 of 3 has p = 1/4");
}

#[test]
fn a_binomial_prior_lets_a_topic_without_history_lean_on_the_market() {
    let rule = |prior_stories| Condition::Binomial {
        p_value: 1e-4,
        baseline_windows: 3,
        min_effect: 0.2,
        min_count: 6,
        min_negative: 0,
        min_baseline_count: 0,
        min_baseline_window_count: 0,
        exit_p_value: None,
        prior_stories,
    };
    let market = [counts(300, 45), counts(300, 45), counts(300, 45)];
    let market: Vec<&Counts> = market.iter().collect();
    let never_seen = Baselines { market: &market, ..Baselines::own(&[]) };
    // No history of its own: without a prior it cannot decide; with one, 11 of 12 against the
    // market's 15 % fires, and 2 of 12 does not.
    assert_eq!(read(&rule(0.0), Metric::NegShare, &counts(12, 11), &never_seen).verdict, Verdict::Undecided);
    let burst = read(&rule(20.0), Metric::NegShare, &counts(12, 11), &never_seen);
    assert_eq!(burst.verdict, Verdict::Breach, "{burst:?}");
    assert!(burst.p.unwrap() < 1e-4 && (burst.baseline.unwrap() - 0.15).abs() < 0.02, "{burst:?}");
    assert_eq!(read(&rule(20.0), Metric::NegShare, &counts(12, 2), &never_seen).verdict, Verdict::Normal);
    // Its own thousands of stories outweigh the prior: a topic that is usually 60 % negative.
    let own = [counts(1000, 600), counts(1000, 600), counts(1000, 600)];
    let own: Vec<&Counts> = own.iter().collect();
    let gloomy = Baselines { market: &market, ..Baselines::own(&own) };
    let usual = read(&rule(20.0), Metric::NegShare, &counts(12, 9), &gloomy);
    assert!((usual.baseline.unwrap() - 0.6).abs() < 0.01 && usual.verdict == Verdict::Normal, "{usual:?}");
    // Hopping windows count each story several times: the same stories weigh once, so the usual
    // share is less certain and the same count weaker evidence.
    let like_market = [counts(100, 15), counts(100, 15), counts(100, 15)];
    let like_market: Vec<&Counts> = like_market.iter().collect();
    let tumbling = Baselines { market: &market, ..Baselines::own(&like_market) };
    let hopping = Baselines { market: &market, overlap: 4.0, ..Baselines::own(&like_market) };
    let (a, b) = match (read(&rule(20.0), Metric::NegShare, &counts(40, 20), &tumbling).p, read(&rule(20.0), Metric::NegShare, &counts(40, 20), &hopping).p) {
        (Some(a), Some(b)) => (a, b),
        other => panic!("{other:?}"),
    };
    assert!(b > a, "less certain baseline, weaker evidence: {a} {b}");
}

#[test]
fn a_swept_condition_field_is_set_and_checked_as_in_a_rule_file() {
    let file = RuleFile::parse(
        "[[rules]]\nname = \"b\"\ngroup = \"topic\"\nmetric = \"neg_share\"\n[rules.condition]\nkind = \"binomial\"\np_value = 0.001\nbaseline_windows = 4\n\n\
         [[rules]]\nname = \"t\"\ngroup = \"topic\"\nmetric = \"n\"\ncondition = { kind = \"threshold\", op = \">\", value = 3 }\n",
        "t.toml",
    )
    .unwrap();
    let (binomial, threshold) = (&file.rules[0], &file.rules[1]);
    let changed = binomial.with_condition("p_value", 0.01).unwrap().unwrap();
    assert!(matches!(changed.condition, Condition::Binomial { p_value, .. } if p_value == 0.01));
    let changed = binomial.with_condition("baseline_windows", 8.0).unwrap().unwrap();
    assert_eq!(changed.condition.baseline_windows(), 8);
    assert!(binomial.with_condition("baseline_windows", 2.5).unwrap_err().contains("whole numbers"));
    assert!(binomial.with_condition("p_value", 1.5).unwrap_err().contains("p_value must be between 0 and 1"));
    assert_eq!(threshold.with_condition("p_value", 0.01).unwrap(), None, "a threshold has no p_value");
    assert_eq!(binomial.with_condition("kind", 1.0).unwrap(), None);
}

/// p_value 1e-4, min_count 6, min_ratio 3, exit under `exit`.
fn count_condition(baseline_windows: usize, season: rules::Season, exit: f64) -> Condition {
    Condition::Count { p_value: 1e-4, baseline_windows, season, min_count: 6, min_ratio: 3.0, min_slot_windows: 3, exit_p_value: Some(exit) }
}


/// Four weeks of 4 h windows starting hourly, each with `stories` and `negative` at its start.
fn weeks(stories: impl Fn(i64) -> (u64, u64)) -> (Vec<Counts>, Vec<i64>) {
    let monday = chrono::DateTime::parse_from_rfc3339("1987-02-02T00:00:00Z").unwrap().timestamp_millis();
    let starts: Vec<i64> = (0..672).map(|h| monday + h * H).collect();
    (starts.iter().map(|s| { let (n, neg) = stories(*s); counts(n, neg) }).collect(), starts)
}

fn weekend(start_ms: i64) -> bool {
    count::slot(rules::Season::Week, start_ms) >= 24
}

/// The miss that a share test cannot see: metals windows usually hold 2 to 4 stories, half of them
/// negative; a burst of 14 stories, 12 negative, is a share of 0.86 (a binomial tail near 0.002)
/// but six times the usual number of negative stories.
#[test]
fn a_count_condition_fires_on_a_volume_surge_in_a_topic_whose_share_is_usually_high() {
    let (past, starts) = weeks(|s| { let n = 2 + (s / H % 3) as u64; (n, n / 2) });
    let refs: Vec<&Counts> = past.iter().collect();
    let now = starts[671] + H;
    let baselines = Baselines { own: &refs, own_starts: &starts, start_ms: now, market: &[], overlap: 1.0, slots: None };
    let reading = read(&count_condition(672, rules::Season::Week, 0.01), Metric::NNegative, &counts(14, 12), &baselines);
    assert_eq!(reading.verdict, Verdict::Breach, "{reading:?}");
    assert!(reading.baseline.is_some_and(|b| (1.0..2.0).contains(&b)) && reading.p.is_some_and(|p| p < 1e-6), "{reading:?}");
    assert!(reading.threshold <= 12.0 && reading.threshold >= 6.0, "{reading:?}");
    // The share test on the same window stays under its bar.
    let share = read(&binomial(0.001, 0.2), Metric::NegShare, &counts(14, 12), &Baselines::own(&refs[refs.len() - 40..]));
    assert_ne!(share.verdict, Verdict::Breach, "{share:?}");
    // A usual window, and one just under min_count, are normal; hysteresis keeps a firing one.
    assert_eq!(read(&count_condition(672, rules::Season::Week, 0.01), Metric::NNegative, &counts(4, 2), &baselines).verdict, Verdict::Normal);
    assert_eq!(read(&count_condition(672, rules::Season::Week, 0.01), Metric::NNegative, &counts(5, 5), &baselines).verdict, Verdict::Normal);
    let lenient = count_condition(672, rules::Season::Week, 0.5);
    assert_eq!(read(&lenient, Metric::NNegative, &counts(8, 6), &baselines).verdict, Verdict::Elevated);
}

#[test]
fn weekday_hours_are_not_weekend_hours_and_a_quiet_holiday_is_not_a_baseline() {
    // Weekdays: about 12 stories, 6 negative; weekends: 1, none negative.
    let (past, starts) = weeks(|s| if weekend(s) { (1, 0) } else { (12 + (s / H % 3) as u64, 6 + (s / H % 2) as u64) });
    let refs: Vec<&Counts> = past.iter().collect();
    let tuesday_afternoon = starts[24 + 14] + 4 * 7 * 24 * H;
    let baselines = Baselines { own: &refs, own_starts: &starts, start_ms: tuesday_afternoon, market: &[], overlap: 1.0, slots: None };
    let busy = counts(14, 8);
    assert_eq!(read(&count_condition(672, rules::Season::Week, 0.01), Metric::NNegative, &busy, &baselines).verdict, Verdict::Normal, "a usual weekday");
    // A Saturday afternoon with a weekday's number of negative stories is a surge for a Saturday;
    // without seasons it would be measured against weekdays (the thin weekends are skipped).
    let saturday = Baselines { start_ms: starts[5 * 24 + 14] + 4 * 7 * 24 * H, ..baselines };
    let weekday_like = counts(9, 8);
    let seasonal = read(&count_condition(672, rules::Season::Week, 0.01), Metric::NNegative, &weekday_like, &saturday);
    assert_eq!(seasonal.verdict, Verdict::Breach, "{seasonal:?}");
    let flat = read(&count_condition(672, rules::Season::None, 0.01), Metric::NNegative, &weekday_like, &saturday);
    assert_eq!(flat.verdict, Verdict::Normal, "{flat:?}");
    // A holiday: the slot's windows on one Tuesday held nothing; they are skipped, not averaged in.
    let (holiday, _) = weeks(|s| {
        let day = (s - starts[0]) / (24 * H);
        if day == 8 { (0, 0) } else if weekend(s) { (1, 0) } else { (12, 6) }
    });
    let with_holiday: Vec<&Counts> = holiday.iter().collect();
    let held = Baselines { own: &with_holiday, ..baselines };
    let reading = read(&count_condition(672, rules::Season::Week, 0.01), Metric::NNegative, &busy, &held);
    assert!((reading.baseline.unwrap() - 6.0).abs() < 0.2, "the holiday is not averaged in: {reading:?}");
    // Too little history in the slot decides nothing.
    let short = Baselines { own: &refs[..30], own_starts: &starts[..30], ..baselines };
    assert_eq!(read(&count_condition(672, rules::Season::Week, 0.01), Metric::NNegative, &busy, &short).verdict, Verdict::Undecided);
}

/// A golden decision table for `kind = "count"`: usual counts at the slot, the window's count, and
/// what the rule says (p_value 1e-4, min_count 6, min_ratio 3, exit under 0.01).
#[test]
fn count_condition_decision_table() {
    let cases: [(&[f64], u64, Verdict); 10] = [
        (&[2.0, 1.0, 2.0, 3.0, 2.0], 12, Verdict::Breach),    // Poisson, 2 usual: 12 is p ~ 1e-6
        (&[2.0, 1.0, 2.0, 3.0, 2.0], 7, Verdict::Elevated),   // p ~ 0.004: under exit, not under p_value
        (&[2.0, 1.0, 2.0, 3.0, 2.0], 4, Verdict::Normal),
        (&[0.0, 0.0, 9.0, 1.0, 0.0, 8.0], 12, Verdict::Normal), // bursty slot: 12 is no surprise
        (&[0.0, 0.0, 9.0, 1.0, 0.0, 8.0], 40, Verdict::Elevated), // p ~ 3e-4: a slot this bursty needs more
        (&[0.0, 0.0, 9.0, 1.0, 0.0, 8.0], 80, Verdict::Breach),
        (&[0.0, 0.0, 0.0, 0.0], 5, Verdict::Normal),           // under min_count however rare
        (&[0.0, 0.0, 0.0, 0.0], 6, Verdict::Breach),
        (&[20.0, 22.0, 19.0, 21.0], 65, Verdict::Breach),
        (&[20.0, 22.0, 19.0, 21.0], 45, Verdict::Normal),      // p ~ 2e-6 but under 3 × usual
    ];
    let rule = count_condition(100, rules::Season::None, 0.01);
    for (past, now, want) in cases {
        let past: Vec<Counts> = past.iter().map(|&c| counts(c as u64 + 2, c as u64)).collect();
        let refs: Vec<&Counts> = past.iter().collect();
        let reading = read(&rule, Metric::NNegative, &counts(now + 2, now), &Baselines::own(&refs));
        assert_eq!(reading.verdict, want, "{past:?} then {now}: {reading:?}");
    }
}

#[test]
fn a_count_alert_says_it_in_words() {
    let mut detector = Detector::new(vec![rule(Metric::NNegative, GroupKind::Topic, count_condition(6, rules::Season::None, 0.01))]);
    for h in 0..6 {
        detector.evaluate(&[row(h, 1, "metals", 4, 2, true)], (h + 1) * H);
    }
    let alerts = detector.evaluate(&[row(6, 1, "metals", 14, 12, true)], 7 * H);
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    let summary = &alerts[0].summary;
    assert!(summary.starts_with("metals: 12 negative in 1 h against 2.1 usual at this hour: p = 2e-6 (alert from 10), 1970-01-01 06:00"), "{summary}");
}

#[test]
fn count_rules_parse_with_their_defaults_and_refuse_a_share() {
    let text = "[[rules]]\nname = \"surge\"\ngroup = \"topic\"\nmetric = \"n_negative\"\n[rules.condition]\nkind = \"count\"\np_value = 1e-4\nbaseline_windows = 672\n";
    let file = RuleFile::parse(text, "r.toml").unwrap();
    assert_eq!(
        file.rules[0].condition,
        Condition::Count { p_value: 1e-4, baseline_windows: 672, season: rules::Season::Week, min_count: 0, min_ratio: 2.0, min_slot_windows: 3, exit_p_value: None }
    );
    let err = RuleFile::parse(&text.replace("n_negative", "neg_share"), "r.toml").unwrap_err().to_string();
    assert!(err.contains("tests a count") && err.contains("rules[0]"), "{err}");
    let err = RuleFile::parse(&text.replace("672", "1"), "r.toml").unwrap_err().to_string();
    assert!(err.contains("min_slot_windows"), "{err}");
    let err = RuleFile::parse(&format!("{text}season = \"month\"\n"), "r.toml").unwrap_err().to_string();
    assert!(err.contains("unknown variant `month`") && err.contains("week"), "{err}");
}

/// The shipped pairing: a share test (binomial, with a floor of negative stories) or a count test
/// of the same topic, one alert.
fn share_or_count() -> Condition {
    let text = "[[rules]]\nname = \"r\"\ngroup = \"topic\"\nmetric = \"neg_share\"\n[rules.condition]\nkind = \"any\"\n\
        [[rules.condition.of]]\nkind = \"binomial\"\np_value = 0.001\nmin_effect = 0.2\nbaseline_windows = 6\nmin_count = 6\nmin_negative = 6\nexit_p_value = 0.01\n\
        [[rules.condition.of]]\nkind = \"count\"\nmetric = \"n_negative\"\np_value = 1e-4\nbaseline_windows = 6\nseason = \"none\"\nmin_count = 6\nmin_ratio = 3.0\nexit_p_value = 0.01\n";
    RuleFile::parse(text, "r.toml").unwrap().rules.remove(0).condition
}

/// A golden decision table for `kind = "any"`: each test's verdict and the one that decides (the
/// strongest; the first listed on a tie). Baselines: six windows of 4 stories, 2 negative (a busy
/// topic whose share is high), or of 8 stories, 1 negative.
#[test]
fn any_condition_decision_table() {
    type Case = ((u64, u64), (u64, u64), [Verdict; 2], Verdict, Option<usize>);
    let cases: [Case; 8] = [
        ((4, 2), (4, 2), [Verdict::Undecided, Verdict::Normal], Verdict::Normal, Some(1)),
        // 12 of 14 negative against half usual: a share tail near 0.006, a count six times usual.
        ((4, 2), (14, 12), [Verdict::Elevated, Verdict::Breach], Verdict::Breach, Some(1)),
        ((4, 2), (16, 10), [Verdict::Normal, Verdict::Breach], Verdict::Breach, Some(1)),
        ((4, 2), (10, 10), [Verdict::Breach, Verdict::Breach], Verdict::Breach, Some(0)),
        ((4, 2), (8, 8), [Verdict::Elevated, Verdict::Elevated], Verdict::Elevated, Some(0)),
        // 6 of 6 against 1 in 8 usual: the share breaches; 6 against about 1 usual is p ~ 6e-4.
        ((8, 1), (6, 6), [Verdict::Breach, Verdict::Elevated], Verdict::Breach, Some(0)),
        // 5 of 5: under min_negative and min_count.
        ((8, 1), (5, 5), [Verdict::Undecided, Verdict::Normal], Verdict::Normal, Some(1)),
        ((8, 1), (8, 1), [Verdict::Normal, Verdict::Normal], Verdict::Normal, Some(0)),
    ];
    let condition = share_or_count();
    let Condition::Any { of } = &condition else { panic!("{condition:?}") };
    for ((past_n, past_negative), (n, negative), tests, want, decided_by) in cases {
        let past: Vec<Counts> = (0..6).map(|_| counts(past_n, past_negative)).collect();
        let refs: Vec<&Counts> = past.iter().collect();
        let baselines = Baselines::own(&refs);
        let each: Vec<Verdict> = read_tests(of, Metric::NegShare, &counts(n, negative), &baselines).iter().map(|r| r.verdict).collect();
        assert_eq!(each, tests, "{negative} of {n} against {past_negative} of {past_n}");
        let reading = read(&condition, Metric::NegShare, &counts(n, negative), &baselines);
        assert_eq!((reading.verdict, reading.test), (want, decided_by), "{negative} of {n}: {reading:?}");
    }
}

/// One surge that both tests see is one alert, named after the test that saw it first, and it
/// stays while either test is past its exit level.
#[test]
fn an_any_rule_raises_one_alert_per_surge_and_names_its_test() {
    let mut detector = Detector::new(vec![rule(Metric::NegShare, GroupKind::Topic, share_or_count())]);
    for h in 0..6 {
        assert!(detector.evaluate(&[row(h, 1, "metals", 4, 2, true)], (h + 1) * H).is_empty());
    }
    let fired = detector.evaluate(&[row(6, 1, "metals", 14, 12, true)], 7 * H);
    assert_eq!(fired.len(), 1, "{fired:?}");
    assert!(fired[0].summary.starts_with("metals (count test): 12 negative in 1 h against 2.1 usual at this hour"), "{}", fired[0].summary);
    // Both tests breach next: still the one alert.
    assert!(detector.evaluate(&[row(7, 1, "metals", 40, 30, true)], 8 * H).is_empty());
    // Back to usual: resolved once.
    let resolved = detector.evaluate(&[row(8, 1, "metals", 4, 2, true)], 9 * H);
    assert_eq!(resolved.iter().map(|a| a.state).collect::<Vec<_>>(), [AlertState::Resolved], "{resolved:?}");
    assert_eq!(resolved[0].alert_id, fired[0].alert_id);

    let mut traced = Detector::new(vec![rule(Metric::NegShare, GroupKind::Topic, share_or_count())]);
    traced.trace(BTreeMap::from([("topic".to_string(), "metals".to_string())]));
    for h in 0..6 {
        traced.evaluate(&[row(h, 1, "metals", 4, 2, true)], (h + 1) * H);
    }
    traced.evaluate(&[row(6, 1, "metals", 14, 12, true)], 7 * H);
    let last = traced.take_trace().pop().unwrap();
    assert_eq!(last.tests.iter().map(|t| (t.test, t.verdict)).collect::<Vec<_>>(), [("share test", Verdict::Elevated), ("count test", Verdict::Breach)]);
}

#[test]
fn any_rules_refuse_nesting_a_query_and_a_test_with_the_wrong_metric() {
    let head = "[[rules]]\nname = \"r\"\ngroup = \"topic\"\nmetric = \"neg_share\"\n[rules.condition]\nkind = \"any\"\n";
    let err = RuleFile::parse(&format!("{head}of = []\n"), "r.toml").unwrap_err().to_string();
    assert!(err.contains("1 to 8 tests"), "{err}");
    let err = RuleFile::parse(&format!("{head}[[rules.condition.of]]\nkind = \"count\"\np_value = 1e-4\nbaseline_windows = 10\n"), "r.toml").unwrap_err().to_string();
    assert!(err.contains("of[0]") && err.contains("tests a count"), "{err}");
    let err = RuleFile::parse(&format!("{head}[[rules.condition.of]]\nkind = \"any\"\nof = []\n"), "r.toml").unwrap_err().to_string();
    assert!(err.contains("of[0]: a test of `any`"), "{err}");
    let err = RuleFile::parse(&format!("{head}[[rules.condition.of]]\nkind = \"binomial\"\np_value = 0.001\nbaseline_windows = 10\nsigma = 2\n"), "r.toml").unwrap_err().to_string();
    assert!(err.contains("sigma"), "an unknown field in a test is refused: {err}");
    // A sweep reaches a test's field by its place.
    let rule = Rule { condition: share_or_count(), ..rule(Metric::NegShare, GroupKind::Topic, share_or_count()) };
    let swept = rule.with_condition("of.1.p_value", 0.01).unwrap().unwrap();
    assert!(matches!(&swept.condition, Condition::Any { of } if matches!(of[1].condition, Condition::Count { p_value, .. } if p_value == 0.01)));
    assert!(rule.with_condition("of.1.p_value", 2.0).is_err());
    assert!(rule.with_condition("of.5.p_value", 0.01).unwrap().is_none());
}

/// Hopping windows: once the newest window (the surge's last hour only) reads normal, the older
/// windows that still hold the surge keep the alert; it resolves when none does, and does not fire
/// again for the same surge.
#[test]
fn an_older_hopping_window_that_still_holds_the_surge_keeps_the_alert() {
    let threshold = Condition::Threshold { op: rules::Op::AtLeast, value: 10.0, min_count: 0, exit_value: None };
    let mut detector = Detector::new(vec![rule(Metric::NNegative, GroupKind::Topic, threshold)]);
    let fired = detector.evaluate(&[row(0, 4, "metals", 12, 12, false)], H);
    assert_eq!(fired.len(), 1);
    // The window starting an hour later holds two of the stories; the first still holds twelve.
    let both = [row(0, 4, "metals", 12, 12, false), row(1, 4, "metals", 2, 2, false)];
    assert!(detector.evaluate(&both, 2 * H).is_empty(), "the older window holds the alert");
    assert!(detector.evaluate(&both, 3 * H).is_empty());
    let later = [row(0, 4, "metals", 12, 12, true), row(1, 4, "metals", 2, 2, false), row(2, 4, "metals", 2, 2, false)];
    assert!(detector.evaluate(&later, 4 * H).is_empty(), "the final row of the first window still holds it");
    let resolved = detector.evaluate(&[row(3, 4, "metals", 1, 1, false)], 5 * H);
    assert_eq!(resolved.iter().map(|a| a.state).collect::<Vec<_>>(), [AlertState::Resolved], "{resolved:?}");
}

#[test]
fn a_share_test_needs_min_negative_stories() {
    let past: Vec<Counts> = (0..6).map(|_| counts(20, 1)).collect();
    let refs: Vec<&Counts> = past.iter().collect();
    let mut condition = binomial(0.001, 0.2);
    if let Condition::Binomial { min_negative, min_count, min_baseline_count, min_baseline_window_count, .. } = &mut condition {
        (*min_negative, *min_count, *min_baseline_count, *min_baseline_window_count) = (6, 5, 0, 0);
    }
    let five = read(&condition, Metric::NegShare, &counts(10, 5), &Baselines::own(&refs));
    assert_eq!(five.verdict, Verdict::Normal, "5 negative stories: {five:?}");
    assert!((five.threshold - 0.6).abs() < 1e-9, "the bar is 6 of 10: {five:?}");
    assert_eq!(read(&condition, Metric::NegShare, &counts(10, 6), &Baselines::own(&refs)).verdict, Verdict::Breach);
}

#[test]
fn slots_by_arithmetic_agree_with_the_calendar() {
    use chrono::{Datelike, Timelike};
    let mut rng = crate::rng::Lcg(7);
    for _ in 0..20_000 {
        let ms = ((rng.next_f64() - 0.3) * 4e12) as i64;
        let at = chrono::DateTime::from_timestamp_millis(ms).unwrap();
        let weekend = at.weekday().number_from_monday() >= 6;
        assert_eq!(count::slot(rules::Season::Day, ms), at.hour(), "{at}");
        assert_eq!(count::slot(rules::Season::Week, ms), at.hour() + if weekend { 24 } else { 0 }, "{at}");
        assert_eq!(count::slot(rules::Season::None, ms), 0);
    }
}

/// A window's live readings reuse its same-slot baseline until the group closes another window;
/// then the baseline is found again (as a detector without the memo would).
#[test]
fn the_count_baseline_memo_follows_the_groups_history() {
    let mut detector = Detector::new(vec![rule(Metric::NNegative, GroupKind::Topic, count_condition(6, rules::Season::None, 0.01))]);
    detector.trace(BTreeMap::from([("topic".to_string(), "metals".to_string())]));
    for h in 0..6 {
        detector.evaluate(&[row(h, 1, "metals", 4, 2, true)], (h + 1) * H);
    }
    // Window 7 read live twice: the same baseline (2 negative a window).
    detector.evaluate(&[row(7, 1, "metals", 3, 1, false)], 8 * H);
    detector.evaluate(&[row(7, 1, "metals", 4, 2, false)], 8 * H + 1);
    // Window 6 closes with 12 negative: window 7's baseline now holds it.
    detector.evaluate(&[row(6, 1, "metals", 12, 12, true)], 8 * H + 2);
    detector.evaluate(&[row(7, 1, "metals", 5, 2, false)], 8 * H + 3);
    let baselines: Vec<f64> = detector.take_trace().iter().filter(|t| t.window_start.starts_with("1970-01-01T07")).map(|t| t.baseline.unwrap()).collect();
    assert_eq!(baselines.len(), 3);
    assert_eq!(baselines[0], baselines[1]);
    assert!(baselines[2] > baselines[1] + 1.0, "the closed surge moved the usual level: {baselines:?}");
    let mut fresh = Detector::new(vec![rule(Metric::NNegative, GroupKind::Topic, count_condition(6, rules::Season::None, 0.01))]);
    fresh.trace(BTreeMap::from([("topic".to_string(), "metals".to_string())]));
    for h in 0..7 {
        let negative = if h == 6 { 12 } else { 2 };
        fresh.evaluate(&[row(h, 1, "metals", if h == 6 { 12 } else { 4 }, negative, true)], (h + 1) * H);
    }
    fresh.evaluate(&[row(7, 1, "metals", 5, 2, false)], 8 * H + 3);
    assert_eq!(fresh.take_trace().last().unwrap().baseline.unwrap(), baselines[2], "as found without the memo");
}
