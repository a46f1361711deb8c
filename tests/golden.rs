//! The committed model through the Rust classifier, against outputs computed by Python onnxruntime
//! (`models/train/golden.py`, one headline per run).

use bearwatch::classify::{Classifier, ClassifierConfig};
use serde_json::Value;

fn golden() -> Vec<Value> {
    let text = std::fs::read_to_string("tests/golden/headlines.jsonl").unwrap();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

async fn score_all(config: ClassifierConfig, golden: &[Value]) -> Vec<bearwatch::news::Scores> {
    let classifier = Classifier::start(&config).unwrap();
    let mut pending = Vec::new();
    for item in golden {
        pending.push(classifier.submit(item["text"].as_str().unwrap()).await.unwrap());
    }
    let mut scores = Vec::new();
    for p in pending {
        scores.push(p.scores().await.unwrap());
    }
    scores
}

#[tokio::test]
async fn one_at_a_time_matches_python_onnxruntime() {
    let golden = golden();
    assert_eq!(golden.len(), 20);
    let config = ClassifierConfig { max_batch_size: 1, threads: 1, ..ClassifierConfig::default() };
    for (expected, got) in golden.iter().zip(score_all(config, &golden).await) {
        let text = &expected["text"];
        assert_eq!(got.sentiment, expected["sentiment"], "{text}");
        assert_eq!(got.topic, expected["topic"], "{text}");
        for (name, value) in [
            ("p_negative", got.p_negative),
            ("p_neutral", got.p_neutral),
            ("p_positive", got.p_positive),
            ("topic_score", got.topic_score),
        ] {
            let want = expected[name].as_f64().unwrap();
            assert!((f64::from(value) - want).abs() < 1e-4, "{text}: {name} {value} vs {want}");
        }
    }
}

/// The model's int8 scales are constants (static quantization, `models/train/quantize.py`), so an
/// item scores the same whatever its batch-mates and padding: batching must not change any output.
#[tokio::test]
async fn batched_scores_stay_close_to_one_at_a_time() {
    let golden = golden();
    let config = ClassifierConfig { max_wait_ms: 200, ..ClassifierConfig::default() };
    let mut max_drift = 0.0f64;
    for (expected, got) in golden.iter().zip(score_all(config, &golden).await) {
        assert_eq!(got.sentiment, expected["sentiment"], "{}", expected["text"]);
        assert_eq!(got.topic, expected["topic"], "{}", expected["text"]);
        for (name, value) in [("p_negative", got.p_negative), ("p_neutral", got.p_neutral), ("p_positive", got.p_positive)] {
            max_drift = max_drift.max((f64::from(value) - expected[name].as_f64().unwrap()).abs());
        }
    }
    eprintln!("largest probability drift in a batch of {}: {max_drift:.5}", golden.len());
    assert!(max_drift < 1e-4, "batch-mates changed a probability by {max_drift}");
}
