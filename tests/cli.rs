//! `bearwatch classify` end to end: the real binary, the committed model, ONNX Runtime from the wheel.

mod common;

use assert_cmd::Command;
use serde_json::Value;

/// DESIGN §9 (taxonomy 2), in the order of the model's topic head.
const TOPICS: [&str; 16] = [
    "earnings",
    "mergers_acquisitions",
    "monetary_policy",
    "macro",
    "currencies",
    "debt_markets",
    "energy",
    "metals",
    "agriculture",
    "equity_markets",
    "analyst_ratings",
    "company_news",
    "financials",
    "legal_regulatory",
    "politics",
    "other",
];

fn classify(args: &[&str], input: impl Into<Vec<u8>>) -> (i32, Vec<Value>, String) {
    let out = Command::cargo_bin("bearwatch").unwrap().arg("classify").args(args).write_stdin(input).output().unwrap();
    let lines = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("output line is not JSON ({e}): {l}")))
        .collect();
    (out.status.code().unwrap(), lines, String::from_utf8_lossy(&out.stderr).into_owned())
}

fn assert_scored(line: &Value) {
    let p = |k: &str| line[k].as_f64().unwrap_or_else(|| panic!("{k} missing in {line}"));
    let sum = p("p_negative") + p("p_neutral") + p("p_positive");
    assert!((sum - 1.0).abs() < 1e-3, "probabilities sum to {sum}: {line}");
    assert!((p("sentiment_score") - (p("p_positive") - p("p_negative"))).abs() < 2e-6, "{line}");
    assert!(["negative", "neutral", "positive"].contains(&line["sentiment"].as_str().unwrap()), "{line}");
    assert!(TOPICS.contains(&line["topic"].as_str().unwrap()), "{line}");
    assert!((0.0..=1.0).contains(&p("topic_score")), "{line}");
    assert_eq!(line["model"], common::bundled_model().as_str());
}

/// The committed model speaks taxonomy 2: its topic head is DESIGN §9 in order, and `models/topics.csv`
/// maps every source label to one of those topics and uses each of them.
#[test]
fn the_model_and_the_topic_mapping_use_the_design_taxonomy() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
    let labels: Value = serde_json::from_str(&std::fs::read_to_string(root.join("labels.json")).unwrap()).unwrap();
    let head: Vec<&str> = labels["topics"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    assert_eq!(head, TOPICS);
    let mapping = std::fs::read_to_string(root.join("topics.csv")).unwrap();
    let mut used = std::collections::BTreeSet::new();
    let mut seen = std::collections::BTreeSet::new();
    for line in mapping.lines().skip(1) {
        let [source, label, topic] = line.splitn(3, ',').collect::<Vec<_>>()[..] else { panic!("bad row {line:?}") };
        assert!(TOPICS.contains(&topic), "{source} {label} maps to {topic:?}, not a DESIGN §9 topic");
        assert!(seen.insert((source, label)), "{source} {label} is mapped twice");
        used.insert(topic);
    }
    let unused: Vec<_> = TOPICS.iter().filter(|t| !used.contains(*t)).collect();
    assert!(unused.is_empty(), "no source label maps to {unused:?}");
}

#[test]
fn scores_news_and_text_lines_keeping_their_fields() {
    let input = concat!(
        r#"{"id":"n1","published_at":"2024-03-01T09:30:00Z","headline":"Oil prices slump as OPEC output rises","tickers":["XOM"],"desk":"energy"}"#,
        "\n",
        r#"{"text":"Company raises full-year profit forecast after record quarter"}"#,
        "\n",
    );
    let (code, lines, stderr) = classify(&[], input);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(lines.len(), 2);
    for line in &lines {
        assert_scored(line);
    }
    assert_eq!(lines[0]["id"], "n1");
    assert_eq!(lines[0]["desk"], "energy");
    assert_eq!(lines[0]["tickers"][0], "XOM");
    assert_eq!(lines[0]["topic"], "energy");
    assert_eq!(lines[1]["text"], "Company raises full-year profit forecast after record quarter");
    assert_eq!(lines[1]["sentiment"], "positive");
}

/// Fields bearwatch does not know are echoed as written: an id beyond 64 bits must not become a float.
#[test]
fn unknown_fields_are_echoed_exactly_however_large_their_numbers() {
    let input = r#"{"text":"Bank shares tumble on loan losses","seq":123456789012345678901234567890,"ratio":0.1000000000000000055511151231257827,"ids":[18446744073709551616]}"#;
    let out = Command::cargo_bin("bearwatch").unwrap().arg("classify").write_stdin(format!("{input}\n")).output().unwrap();
    let line = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        line.starts_with(r#"{"text":"Bank shares tumble on loan losses","seq":123456789012345678901234567890,"ratio":0.1000000000000000055511151231257827,"ids":[18446744073709551616],"topic":"#),
        "{line}"
    );
    assert_scored(&serde_json::from_str(&line).unwrap());
}

#[test]
fn bad_lines_get_an_error_line_and_the_run_goes_on() {
    let mut input = Vec::new();
    input.extend_from_slice(b"not json\n");
    input.extend_from_slice(b"{\"text\":\"Bank shares tumble on loan losses\"}\n");
    input.extend_from_slice(b"\n");
    input.extend_from_slice(b"{\"id\":\"x\",\"headline\":\"no timestamp\"}\n");
    input.extend_from_slice(b"\xff\xfe invalid utf-8\n");
    input.extend_from_slice(b"[1,2]\n");
    input.extend_from_slice(b"{\"text\":\"   \"}\n");
    input.extend_from_slice(b"{\"id\":\"y\",\"published_at\":\"2024-01-01T00:00:00Z\",\"headline\":\"Fed holds rates\"}");
    let (code, lines, stderr) = classify(&[], input.clone());
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(lines.len(), 8, "one output line per input line");
    for (index, expected) in [(0, "not valid JSON"), (2, "empty line"), (3, "published_at"), (4, "not valid JSON"), (5, "JSON object"), (6, "empty")] {
        assert_eq!(lines[index]["line"], index as u64 + 1, "{}", lines[index]);
        assert!(lines[index]["error"].as_str().unwrap().contains(expected), "{}", lines[index]);
    }
    assert_scored(&lines[1]);
    assert_scored(&lines[7]);
    assert_eq!(lines[7]["id"], "y");

    let (strict_code, strict_lines, _) = classify(&["--strict"], input);
    assert_eq!(strict_code, 1);
    assert_eq!(strict_lines.len(), 8);
}

#[test]
fn an_overlong_line_is_refused_without_losing_the_next_one() {
    let mut input = format!("{{\"text\":\"{}\"}}\n", "a".repeat(3 << 20)).into_bytes();
    input.extend_from_slice(b"{\"text\":\"Gold price rises\"}\n");
    let (code, lines, stderr) = classify(&[], input);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(lines.len(), 2);
    assert!(lines[0]["error"].as_str().unwrap().contains("longer than"), "{}", lines[0]);
    assert_eq!(lines[0]["line"], 1);
    assert_scored(&lines[1]);
}

#[test]
fn body_chars_adds_the_body_lead_to_what_is_classified() {
    let story = concat!(
        r#"{"id":"r","published_at":"1987-03-02T10:00:00Z","headline":"COMPANY REPORTS","#,
        r#""body":"Net income rose to 12.5 mln dlrs, or 1.10 dlrs a share, from 9.1 mln dlrs a year earlier."}"#,
        "\n"
    );
    let (_, headline_only, _) = classify(&[], story);
    let (code, with_body, stderr) = classify(&["--body-chars", "200"], story);
    assert_eq!(code, 0, "{stderr}");
    assert_scored(&with_body[0]);
    // The model saw different text: its scores changed.
    assert_ne!(headline_only[0]["topic_score"], with_body[0]["topic_score"]);
    assert_ne!(headline_only[0]["p_positive"], with_body[0]["p_positive"]);
    // The echoed fields are the input's, not the text that was classified.
    assert_eq!(with_body[0]["headline"], "COMPANY REPORTS");
}

#[test]
fn empty_input_gives_empty_output() {
    let (code, lines, stderr) = classify(&["--strict"], "");
    assert_eq!(code, 0, "{stderr}");
    assert!(lines.is_empty());
}

#[test]
fn output_keeps_input_order_across_batches() {
    // Lengths vary so the batcher groups items out of arrival order.
    let input: String = (0..300)
        .map(|i| {
            let words = "markets rally as investors cheer strong earnings ".repeat(1 + i % 7);
            format!("{{\"id\":\"{i}\",\"published_at\":\"2024-01-01T00:00:00Z\",\"headline\":\"{i} {words}\"}}\n")
        })
        .collect();
    let (code, lines, stderr) = classify(&["--max-batch-size", "16", "--max-batch-tokens", "512"], input);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(lines.len(), 300);
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["id"], i.to_string());
        assert_scored(line);
    }
}

#[test]
fn reads_a_file_argument() {
    let (code, lines, stderr) = classify(&["pipelines/data/reuters-1987.jsonl", "--strict"], "");
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(lines.len(), 3000);
    assert_eq!(lines[0]["id"], "reuters-1");
}

#[test]
fn a_missing_runtime_library_says_what_to_run() {
    let out = Command::cargo_bin("bearwatch")
        .unwrap()
        .arg("classify")
        .env("ORT_DYLIB_PATH", "/nonexistent/libonnxruntime.so.1.31.1")
        .write_stdin("{\"text\":\"x\"}\n")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("scripts/setup-ort.sh") && stderr.contains("ORT_DYLIB_PATH"), "{stderr}");
}

#[test]
fn bad_settings_are_usage_errors() {
    let (code, lines, stderr) = classify(&["--max-batch-size", "0"], "{\"text\":\"x\"}\n");
    assert_eq!(code, 2);
    assert!(lines.is_empty());
    assert!(stderr.contains("max_batch_size"), "{stderr}");

    let (code, _, stderr) = classify(&["--model", "/nonexistent"], "{\"text\":\"x\"}\n");
    assert_eq!(code, 1);
    assert!(stderr.contains("/nonexistent/labels.json"), "{stderr}");

    // Refused before any broker is asked (none listens here).
    for (args, said) in [(["--speed=-1", "--max-gap", "1h"], "--speed must be"), (["--speed=60", "--max-gap", "0s"], "--max-gap must be more than 0")] {
        let out = Command::cargo_bin("bearwatch")
            .unwrap()
            .args(["produce", "--brokers", "127.0.0.1:1", "--topic", "news"])
            .args(args)
            .arg(format!("{}/pipelines/data/reuters-1987.jsonl", common::ROOT))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(said), "{args:?}: {stderr}");
    }
}

#[test]
fn cuda_is_refused_loudly_without_a_gpu_build() {
    // The CPU wheel has no CUDA provider: asking for it must fail, never fall back to CPU.
    let (code, lines, stderr) = classify(&["--device", "cuda"], "{\"text\":\"x\"}\n");
    assert_eq!(code, 1);
    assert!(lines.is_empty());
    assert!(stderr.contains("CUDA"), "{stderr}");
}
