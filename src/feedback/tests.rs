use super::*;

fn story() -> Story {
    Story {
        id: "s1".into(),
        headline: "MIDLAND <MLA> SETS STOCK SPLIT".into(),
        model: "bearwatch-minilm-l6@2.0.0".into(),
        sentiment: "negative".into(),
        sentiment_score: 0.78,
        topic: "earnings".into(),
        topic_score: 0.6,
    }
}

fn topics() -> Vec<String> {
    ["earnings", "equity_markets", "other"].map(String::from).to_vec()
}

fn request(json: &str) -> LabelRequest {
    serde_json::from_str(json).unwrap()
}

fn row(json: &str, story: Option<&Story>) -> Result<LabelFeedback, FeedbackError> {
    let topics = topics();
    request(json).into_row(LabelContext { story, topics: &topics, analyst: "ana", source: Channel::Api, supersedes: None, created_at: chrono::Utc::now() })
}

#[test]
fn a_label_is_a_correction_unless_it_is_what_the_model_said() {
    let s = story();
    let corrected = row(r#"{"story_id": "s1", "head": "sentiment", "label": "positive"}"#, Some(&s)).unwrap();
    assert_eq!(corrected.action, Action::Correct);
    assert_eq!((corrected.model_label.as_deref(), corrected.model_score), (Some("negative"), Some(0.78)));
    assert_eq!(corrected.analyst_label.as_deref(), Some("positive"));
    assert_eq!(corrected.text, s.headline);
    assert_eq!(corrected.text_hash, text_hash(&s.headline));
    assert_eq!(corrected.text_hash.len(), 64);
    let confirmed = row(r#"{"story_id": "s1", "head": "topic", "label": "earnings"}"#, Some(&s)).unwrap();
    assert_eq!(confirmed.action, Action::Confirm);
    assert_ne!(confirmed.feedback_id, corrected.feedback_id);
}

#[test]
fn wrong_labels_are_refused_with_what_is_allowed() {
    let s = story();
    let err = row(r#"{"story_id": "s1", "head": "topic", "label": "crypto"}"#, Some(&s)).unwrap_err().to_string();
    assert!(err.contains("\"crypto\" is not one of earnings, equity_markets, other"), "{err}");
    let err = row(r#"{"story_id": "s1", "head": "sentiment", "label": "bearish"}"#, Some(&s)).unwrap_err().to_string();
    assert!(err.contains("negative, neutral, positive"), "{err}");
    let err = row(r#"{"story_id": "s1", "head": "sentiment", "label": "positive", "action": "confirm"}"#, Some(&s)).unwrap_err();
    assert!(err.to_string().contains("the model said \"negative\""), "{err}");
    assert!(row(r#"{"head": "sentiment", "label": "positive"}"#, None).unwrap_err().to_string().contains("story_id"));
    assert!(row(r#"{"text": "x", "head": "sentiment"}"#, None).unwrap_err().to_string().contains("required"));
    let long = format!(r#"{{"text": "x", "head": "sentiment", "label": "neutral", "note": "{}"}}"#, "n".repeat(MAX_NOTE_CHARS + 1));
    assert!(row(&long, None).unwrap_err().to_string().contains("note"));
    assert!(serde_json::from_str::<LabelRequest>(r#"{"text": "x", "head": "sentiment", "analyst": "eve"}"#).is_err(), "analyst is not a field");
    assert_eq!(row(r#"{"story_id": "s1", "head": "topic", "label": "x"}"#, Some(&s)).unwrap_err().class(), ErrorClass::User);
}

#[test]
fn unsure_needs_no_label_and_records_none() {
    let r = row(r#"{"text": "Shares of XYZ move", "head": "sentiment", "action": "unsure"}"#, None).unwrap();
    assert_eq!((r.action, r.analyst_label, r.model), (Action::Unsure, None, None));
    let r = row(r#"{"text": "Shares of XYZ move", "head": "sentiment", "action": "unsure", "note": "  "}"#, None).unwrap();
    assert_eq!((r.action, r.note), (Action::Unsure, None));
}

#[test]
fn a_missed_event_needs_a_span_and_a_known_topic() {
    let topics = topics();
    let missed: MissedRequest = serde_json::from_str(r#"{"topic": "earnings", "from": "1987-03-02T00:00:00Z", "to": "1987-03-03T00:00:00Z"}"#).unwrap();
    let requested = chrono::Utc::now();
    let event = missed.into_row(&topics, "ana", requested).unwrap();
    assert_eq!(event.topic.as_deref(), Some("earnings"));
    assert_eq!(event.created_at, requested, "the row carries its request's time");
    let backwards: MissedRequest = serde_json::from_str(r#"{"from": "1987-03-03T00:00:00Z", "to": "1987-03-02T00:00:00Z"}"#).unwrap();
    assert!(backwards.into_row(&topics, "ana", chrono::Utc::now()).unwrap_err().to_string().contains("before"));
    let unknown: MissedRequest = serde_json::from_str(r#"{"topic": "weather", "from": "1987-03-02T00:00:00Z", "to": "1987-03-03T00:00:00Z"}"#).unwrap();
    assert!(unknown.into_row(&topics, "ana", chrono::Utc::now()).is_err());
}

#[test]
fn each_record_call_appends_one_readable_file_and_keeps_the_earlier_ones() {
    let dir = tempfile::tempdir().unwrap();
    let s = story();
    let first = row(r#"{"story_id": "s1", "head": "sentiment", "label": "positive"}"#, Some(&s)).unwrap();
    let second = row(r#"{"text": "Gold rises", "head": "topic", "label": "other", "note": "not metals?"}"#, None).unwrap();
    record_labels(&dir.path().into(), std::slice::from_ref(&first)).unwrap();
    record_labels(&dir.path().into(), &[second]).unwrap();
    record_labels(&dir.path().into(), &[]).unwrap();
    let files: Vec<_> = std::fs::read_dir(dir.path().join("label_feedback")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(files.len(), 2, "{files:?}");
    let mut rows = 0;
    for file in files {
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(file).unwrap()).unwrap();
        assert_eq!(reader.schema().fields(), label_feedback_schema().fields());
        rows += reader.build().unwrap().map(|b| b.unwrap().num_rows()).sum::<usize>();
    }
    assert_eq!(rows, 2);
}

#[test]
fn texts_without_words_unsure_with_a_label_and_endless_events_are_refused() {
    for text in ["\u{200b}\u{200b}", "?!", " -- "] {
        let json = serde_json::json!({"text": text, "head": "sentiment", "label": "neutral"}).to_string();
        assert!(row(&json, None).unwrap_err().to_string().contains("no letter or digit"), "{text:?}");
    }
    let err = row(r#"{"text": "Oil falls", "head": "sentiment", "label": "neutral", "action": "unsure"}"#, None).unwrap_err();
    assert!(err.to_string().contains("unsure takes no label"), "{err}");
    assert!(row(r#"{"text": "Oil falls", "head": "sentiment", "action": "unsure"}"#, None).is_ok());
    let missed = |from: &str, to: &str| serde_json::from_str::<MissedRequest>(&format!(r#"{{"from": "{from}", "to": "{to}"}}"#)).unwrap().into_row(&topics(), "ana", chrono::Utc::now());
    assert!(missed("1987-03-02T00:00:00Z", "1987-03-03T00:00:00Z").is_ok());
    assert!(missed("0001-01-01T00:00:00Z", "9999-01-01T00:00:00Z").unwrap_err().to_string().contains("at most 31 days"));
    assert!(missed("9999-01-01T00:00:00Z", "9999-01-02T00:00:00Z").unwrap_err().to_string().contains("between 1970 and now"));
    assert!(missed("0001-01-01T00:00:00Z", "0001-01-02T00:00:00Z").unwrap_err().to_string().contains("between 1970 and now"));
}

#[test]
fn latest_labels_follow_every_writer_and_an_older_row_read_late_does_not_win() {
    let dir = tempfile::tempdir().unwrap();
    let mut latest = LatestLabels::new(&dir.path().into());
    // The table keeps milliseconds: rows made a few apart.
    let pause = || std::thread::sleep(std::time::Duration::from_millis(3));
    let older = judgement(None, "Oil falls", Head::Sentiment, Some("neutral"), Action::Correct);
    pause();
    let newer = judgement(None, "Oil falls", Head::Sentiment, Some("negative"), Action::Correct);
    // This process wrote the newer row; another writer's older row arrives afterwards.
    latest.note(&newer);
    record_labels(&dir.path().into(), std::slice::from_ref(&older)).unwrap();
    latest.refresh().unwrap();
    assert_eq!(latest.get(&older.text_hash, Head::Sentiment), Some(&newer.feedback_id));
    assert_eq!(latest.get(&older.text_hash, Head::Topic), None, "heads are apart");
    // A newer row from another writer wins; files already read are not read again.
    pause();
    let newest = judgement(None, "Oil falls", Head::Sentiment, None, Action::Unsure);
    record_labels(&dir.path().into(), std::slice::from_ref(&newest)).unwrap();
    latest.refresh().unwrap();
    assert_eq!(latest.get(&older.text_hash, Head::Sentiment), Some(&newest.feedback_id));
}

#[test]
fn the_tail_takes_each_label_once_while_the_journal_merges_under_it() {
    let dir = tempfile::tempdir().unwrap();
    let storage: storage::Location = dir.path().into();
    let label = |text: &str| row(&format!(r#"{{"text": "{text}", "head": "sentiment", "label": "negative"}}"#), None).unwrap();
    // Rounds as if run hours later: appends made now are then settled, and one made after a
    // round falls in a merged hour (as from a writer whose clock is behind).
    let merge = |hours: i64| storage::merge_journal(&storage, Table::LabelFeedback, chrono::Utc::now() + chrono::Duration::hours(hours)).unwrap();
    let mut tail = JournalTail::new(&storage);
    let mut taken: Vec<String> = Vec::new();
    let mut take = |tail: &mut JournalTail| taken.extend(tail.new_rows().unwrap().into_iter().map(|r| r.text));
    record_labels(&storage, &[label("a"), label("b")]).unwrap();
    record_labels(&storage, &[label("c")]).unwrap();
    take(&mut tail);
    assert!(merge(3).merges >= 1);
    take(&mut tail);
    record_labels(&storage, &[label("d")]).unwrap();
    take(&mut tail);
    assert!(merge(3).rescued <= 1);
    take(&mut tail);
    merge(5);
    take(&mut tail);
    record_labels(&storage, &[label("e")]).unwrap();
    merge(5);
    take(&mut tail);
    for hours in [30, 30, 60, 60] {
        merge(hours);
        take(&mut tail);
    }
    taken.sort();
    assert_eq!(taken, ["a", "b", "c", "d", "e"]);
    let mut fresh: Vec<String> = JournalTail::new(&storage).new_rows().unwrap().into_iter().map(|r| r.text).collect();
    fresh.sort();
    assert_eq!(fresh, ["a", "b", "c", "d", "e"]);
    let files = storage::journal_files(&storage, Table::LabelFeedback).unwrap();
    assert!(files.len() <= 3 && files.iter().any(|n| n.contains("-merged-day")), "{files:?}");
}

#[test]
fn an_append_read_before_a_merge_hid_it_is_not_taken_again_from_its_copy() {
    let dir = tempfile::tempdir().unwrap();
    let storage: storage::Location = dir.path().into();
    let mut tail = JournalTail::new(&storage);
    record_labels(&storage, &[row(r#"{"text": "Oil falls", "head": "sentiment", "label": "negative"}"#, None).unwrap()]).unwrap();
    assert_eq!(tail.new_rows().unwrap().len(), 1);
    // What a merge round does with an append that landed in a merged hour without being held:
    // the same id under a later time, the original gone.
    let folder = dir.path().join("label_feedback");
    let appended = storage::journal_files(&storage, Table::LabelFeedback).unwrap().remove(0);
    let copy = format!("{:013}{}", chrono::Utc::now().timestamp_millis() + 7_200_000, &appended[13..]);
    std::fs::rename(folder.join(&appended), folder.join(copy)).unwrap();
    assert!(tail.new_rows().unwrap().is_empty());
    assert_eq!(JournalTail::new(&storage).new_rows().unwrap().len(), 1);
    // A file merged and deleted between the listing and the read is no error: its merge follows.
    assert!(storage::read_journal_file(&storage, Table::LabelFeedback, &appended).unwrap().is_none());
}
