//! `classify --explain`: word-level reasons by leave-one-out occlusion, through the committed model,
//! and a check that they are faithful: leaving out a text's three strongest words lowers its
//! negativity more, on average over the golden headlines, than leaving out three random words.

use assert_cmd::Command;
use bearwatch::classify::{Classifier, ClassifierConfig};
use bearwatch::rng::Lcg;
use serde_json::Value;

fn golden() -> Vec<String> {
    let text = std::fs::read_to_string("tests/golden/headlines.jsonl").unwrap();
    text.lines().map(|l| serde_json::from_str::<Value>(l).unwrap()["text"].as_str().unwrap().to_string()).collect()
}

fn without(words: &[&str], left_out: &[usize]) -> String {
    words.iter().enumerate().filter(|(i, _)| !left_out.contains(i)).map(|(_, w)| *w).collect::<Vec<_>>().join(" ")
}

#[tokio::test]
async fn the_strongest_words_lower_negativity_more_than_random_ones() {
    let classifier = Classifier::start(&ClassifierConfig::default()).unwrap();
    let mut rng = Lcg(2026);
    let (mut top, mut random, mut texts) = (0.0f64, 0.0f64, 0);
    for text in golden() {
        let words: Vec<&str> = text.split_whitespace().collect();
        if words.len() < 5 {
            continue;
        }
        let explained = classifier.explain(&text).await.unwrap();
        let alone = classifier.classify(&text).await.unwrap();
        // The same scores as classifying the text alone (batching moves the last digits only).
        assert_eq!((explained.scores.sentiment, &explained.scores.topic), (alone.sentiment, &alone.topic), "{text}");
        assert!((explained.scores.p_negative - alone.p_negative).abs() < 1e-4, "{text}");
        assert_eq!(explained.why.len(), words.len(), "{text}: one effect per word");
        assert!(explained.why.windows(2).all(|w| w[0].effect >= w[1].effect), "{text}: strongest first");
        let p = f64::from(explained.scores.p_negative);
        let strongest: Vec<usize> = explained.why.iter().take(3).map(|w| w.position).collect();
        top += p - f64::from(classifier.classify(&without(&words, &strongest)).await.unwrap().p_negative);
        let draws = 5;
        for _ in 0..draws {
            let mut picked = Vec::new();
            while picked.len() < 3 {
                let i = rng.below(words.len());
                if !picked.contains(&i) {
                    picked.push(i);
                }
            }
            random += (p - f64::from(classifier.classify(&without(&words, &picked)).await.unwrap().p_negative)) / draws as f64;
        }
        texts += 1;
    }
    let (top, random) = (top / texts as f64, random / texts as f64);
    eprintln!("over {texts} headlines: leaving out the top 3 words lowers p_negative by {top:.4} on average, 3 random words by {random:.4}");
    assert!(texts >= 10, "only {texts} golden headlines have 5 words or more");
    assert!(top > random, "top-3 drop {top:.4} is not above the random-3 drop {random:.4}");
}

#[test]
fn classify_explain_adds_why_to_each_line() {
    let input = "{\"id\":\"n1\",\"published_at\":\"2024-03-01T09:30:00Z\",\"headline\":\"Bank shares tumble on mounting loan losses\"}\nnot json\n";
    let out = Command::cargo_bin("bearwatch").unwrap().args(["classify", "--explain"]).write_stdin(input).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<Value> = String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    let why = lines[0]["why"].as_array().unwrap();
    assert_eq!(why.len(), 7, "{}", lines[0]);
    let words: Vec<&str> = why.iter().map(|w| w["word"].as_str().unwrap()).collect();
    for word in ["Bank", "shares", "tumble", "on", "mounting", "loan", "losses"] {
        assert!(words.contains(&word), "{word} missing from {words:?}");
    }
    let effects: Vec<f64> = why.iter().map(|w| w["effect"].as_f64().unwrap()).collect();
    assert!(effects.windows(2).all(|w| w[0] >= w[1]), "{effects:?}");
    assert_eq!(lines[0]["sentiment"], "negative");
    assert!(lines[1]["error"].as_str().is_some(), "a bad line still gets its error line: {}", lines[1]);
}
